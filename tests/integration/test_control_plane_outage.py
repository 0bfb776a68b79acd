"""The API server, then etcd, stopped for a minute while the operator, the gateway and a batch runner work.

Everything is a real process on 127.0.0.1: the operator (`sd-operator run`) with SDInstances whose pods
kwok runs on this test's fake GPU nodes; the gateway (`sd-operator gateway --kubernetes`) in front of WebUI
emulators; and a GenerationBatch runner (`sd-operator batch --report kubernetes`) rendering through the
gateway and writing its progress into a real GenerationBatch's status. The emulators reach the gateway
through its backends file: an EndpointSlice may not hold a loopback address, so the backends discovered
from the SDInstances' EndpointSlices are kwok's pod IPs, which the gateway lists but is never asked to
reach (their model is not the one the requests name).

While the component is stopped: the gateway answers generation requests and still lists what it
discovered, the runner keeps rendering. After it is back: the operator (the same process) reconciles
what changed right after, with exactly one child of each kind per SDInstance; the runner's status shows
the progress made meanwhile; the batch ends with every item rendered exactly once.

And a runner whose API server never answers (no cluster needed): it renders everything, and gives up
publishing its last counts at its bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client

from cluster_support import (
    Cluster,
    free_port,
    start_operator,
    stop_operator,
    wait_control_plane_settled,
    write_when_back,
)
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION, get, sdi, wait_phase
from processes import BIN, Proc, _start, _wait_ok, emulator, gateway

# The scenario: a minute without the component.
OUTAGE_SECONDS = float(os.environ.get("SD_OUTAGE_SECONDS", "60"))
BATCH_MODEL = "animeA_v1.safetensors"  # rendered by the batch, on two emulators
PROBE_MODEL = "probe_v1.safetensors"  # the test's own generation requests, on a third
BATCH_EMULATORS = 2
# A 128x128 item at the runner's 20 steps takes the emulator 1.0 s at this speed (simulated time: a lower
# bound whatever the machine's load). The batch lasts at least the outage plus 25 s, so it is still
# rendering when the component comes back and its progress then has to be published.
ITEM_SPEED = 24.0
ITEMS = int(BATCH_EMULATORS * (OUTAGE_SECONDS + 25))
SIDECAR = re.compile(r"^(\d+)-(\d+)\.json$")
CHILD_KINDS = ("ConfigMap", "Deployment", "Service", "NetworkPolicy")
# kopf logs each failed request of each of its watch streams at ERROR while it retries (1, 1, 2, 3, 5, 8,
# 13, 21 s, then it lists and watches again): 96 error records in a 60 s API server outage, 5 in an etcd
# outage (writes that timed out, retried). What would not be bounded: a line per event or per second.
MAX_OPERATOR_ERROR_RECORDS = 400


def batch_object(name: str) -> dict[str, Any]:
    # Suspended: the test's runner process is the batch's pod (under kwok the controller's Job would
    # "complete" at once without rendering anything); the controller still owns phase and conditions.
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GenerationBatch",
        "metadata": {"name": name},
        "spec": {
            "target": {"model": BATCH_MODEL},
            "items": {"file": {"claimName": "in", "path": "items.jsonl"}},
            "output": {"pvc": {"claimName": "out", "path": name}},
            "suspend": True,
        },
    }


def sidecars(out: Path) -> Counter[int]:
    return Counter(int(m[1]) for p in os.scandir(out) if (m := SIDECAR.match(p.name))) if out.exists() else Counter()


def generations(emulators: list[Proc]) -> int:
    return sum(requests.get(f"{e.url}/emulator/stats", timeout=5).json()["generations"] for e in emulators)


def gauge(url: str, name: str) -> float | None:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def children(cluster: Cluster, namespace: str) -> Counter[tuple[str, str, str]]:
    """(owner name, owner uid, kind) of every child of an SDInstance in the namespace."""
    listers: dict[str, Callable[[str], Any]] = {
        "ConfigMap": cluster.core.list_namespaced_config_map,
        "Deployment": cluster.apps.list_namespaced_deployment,
        "Service": cluster.core.list_namespaced_service,
        "NetworkPolicy": client.NetworkingV1Api(cluster.api).list_namespaced_network_policy,
    }
    found: Counter[tuple[str, str, str]] = Counter()
    for kind, lister in listers.items():
        for obj in lister(namespace).items:
            for ref in obj.metadata.owner_references or []:
                if ref.kind == "SDInstance":
                    found[(ref.name, ref.uid, kind)] += 1
    return found


RECORD_START = re.compile(r"(?m)^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )")
TEST_NAMESPACE = re.compile(r"\bt-[a-z0-9-]+-[0-9a-f]{6}\b")


def own_records(log: str, namespace: str) -> list[str]:
    """The operator's log records (a line with its time, and the lines that follow it: kopf's copy with the
    object's name, a traceback) less those about other tests' namespaces: the operator watches them all,
    and one that is being deleted while it runs is not this test's business."""
    records = [r for r in RECORD_START.split(log) if r.strip()]
    return [r for r in records if namespace in r or not TEST_NAMESPACE.search(r)]


def first_times(checks: dict[str, Callable[[], bool]], since: float, timeout: float) -> dict[str, float]:
    """Seconds from `since` until each check first held: each polled in a thread of its own, so that one
    waiting on a recovering API server does not delay the others' times (fails on timeout)."""
    seen: dict[str, float] = {}

    def poll(name: str, check: Callable[[], bool]) -> None:
        deadline = since + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the API server still recovering: not yet
                if check():
                    seen[name] = round(time.monotonic() - since, 1)
                    return
            time.sleep(0.5)

    threads = [threading.Thread(target=poll, args=item, daemon=True) for item in checks.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = sorted(set(checks) - set(seen))
    assert not missing, f"not recovered within {timeout}s: {missing}"
    return seen


@pytest.mark.timeout(OUTAGE_SECONDS + 300)
@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_operator_gateway_and_batch_runner_ride_out_a_control_plane_outage(
    component: str, cluster: Cluster, crds: None, namespace: str, gpu_pool: str, tmp_path: Path
) -> None:
    if cluster.local is None:
        pytest.skip("stopping a control-plane component needs the session's own local cluster")
    local: Any = cluster.local
    custom = client.CustomObjectsApi(cluster.api)
    procs: list[Proc] = []
    op = start_operator(cluster, tmp_path / "operator.log")
    runner: subprocess.Popen[bytes] | None = None
    stop_traffic = threading.Event()
    settled = True  # False from the stop until the cluster has recovered
    try:
        # -- before: two reconciled instances, a gateway, a runner that has published progress -------------
        for name in ("a", "b"):
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi(name, gpu_pool))
        batch_emus = [emulator(tmp_path, f"e{i}", BATCH_MODEL, speed=ITEM_SPEED) for i in range(BATCH_EMULATORS)]
        probe = emulator(tmp_path, "probe", PROBE_MODEL)
        procs += [*batch_emus, probe]
        backends = tmp_path / "backends.yaml"
        backends.write_text(yaml.safe_dump({"backends": [{"url": e.url} for e in [*batch_emus, probe]]}))
        gw = _start(
            [str(BIN / "sd-operator"), "gateway", "--port", "0", "--kubernetes", "-n", namespace,
             "--backends-file", str(backends)],
            tmp_path / "gateway.log",
            "GATEWAY_PORT",
            env={"KUBECONFIG": str(cluster.kubeconfig)},
        )  # fmt: skip
        procs.append(gw)
        _wait_ok(f"{gw.url}/readyz")
        for name in ("a", "b"):
            wait_phase(custom, namespace, name, "Ready")

        def slice_urls() -> set[str]:
            """The ready endpoints of the instances' EndpointSlices: what discovery should serve."""
            slices = client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
                namespace, label_selector="sd-operator.dev/instance"
            )
            return {
                f"http://{address}:7861"
                for x in slices.items
                for e in x.endpoints or []
                if e.conditions.ready is not False
                for address in e.addresses
            }

        def listed() -> set[str]:
            return {i["url"] for i in requests.get(f"{gw.url}/v1/instances", timeout=5).json()}

        emulator_urls = {e.url for e in [*batch_emus, probe]}
        known = wait_for(lambda: len(slice_urls()) == 2 and slice_urls(), timeout=60, what="the two pods' endpoints")
        wait_for(lambda: listed() == emulator_urls | known, timeout=60, what="the gateway to list every backend")

        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "generationbatches", batch_object("outage")
        )
        batch_file = tmp_path / "batch.json"
        batch_file.write_text(json.dumps({**batch_object("outage"), "metadata": created["metadata"]}))
        items = tmp_path / "items.jsonl"
        items.write_text(
            "".join(json.dumps({"prompt": f"a lighthouse, study {i}", "width": 128, "height": 128}) + "\n"
                    for i in range(ITEMS))
        )  # fmt: skip
        out = tmp_path / "out"
        runner_log = tmp_path / "runner.log"
        with runner_log.open("wb") as log:
            runner = subprocess.Popen(
                [str(BIN / "sd-operator"), "batch", "--batch-file", str(batch_file), "--gateway-url", gw.url,
                 "--report", "kubernetes", "--items-file", str(items), "--output-dir", str(out)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
            )  # fmt: skip

        def batch_status() -> dict[str, Any]:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "generationbatches", "outage")
            return obj.get("status") or {}

        wait_for(lambda: (batch_status().get("succeeded") or 0) >= 2, timeout=60, what="the runner's progress")

        codes: list[int] = []

        def traffic() -> None:
            # Generation requests for the probe model through the gateway, one after the other.
            body = {"prompt": "a probe", "width": 64, "height": 64, "steps": 4}
            while not stop_traffic.is_set():
                try:
                    r = requests.post(
                        f"{gw.url}/sdapi/v1/txt2img", json=body, headers={"X-SD-Model": PROBE_MODEL}, timeout=30
                    )
                    codes.append(r.status_code if r.status_code != 200 or r.json().get("images") else -200)
                except requests.RequestException:
                    codes.append(0)
                stop_traffic.wait(0.2)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        wait_for(lambda: len(codes) >= 3, timeout=30, what="generation requests through the gateway")
        operator_pid = op.process.pid

        # -- the outage -------------------------------------------------------------------------------------
        settled = False
        local.stop_component(component)
        stopped = time.monotonic()
        try:
            rendered_at_stop, requests_at_stop = len(sidecars(out)), len(codes)
            # The outage itself lasts OUTAGE_SECONDS; the checks below read what was done meanwhile.
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
            assert listed() == emulator_urls | known, "the gateway forgot backends during the outage"
            rendered_in_outage = len(sidecars(out)) - rendered_at_stop
            requests_in_outage = len(codes) - requests_at_stop
            assert runner.poll() is None, runner_log.read_text()[-3000:]
            assert op.process.poll() is None, op.log()[-3000:]
            assert rendered_in_outage >= 10, rendered_in_outage
            assert requests_in_outage >= 10, requests_in_outage
            done_at_end = len(sidecars(out))
        finally:
            local.start_component(component)
        restarted = time.monotonic()

        # -- right after: changes for the operator; when did each part pick up again ------------------------
        # (etcd back, the API server answers 504 until its client has reconnected: the first write that
        # passes is the earliest change anyone could make)
        c = sdi("c", gpu_pool, replicas=0)  # no GPU left in the pool; Ready with no pod
        write_when_back(lambda: custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, c))
        writable = round(time.monotonic() - restarted, 1)
        write_when_back(lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "b", {"spec": {"webui": {"extraArgs": ["--no-hashing"]}}}
        ))  # fmt: skip

        def b_rerendered() -> bool:
            deployment = cluster.apps.read_namespaced_deployment("b-webui", namespace)
            return "--no-hashing" in (deployment.spec.template.spec.containers[0].args or [])

        def c_children() -> bool:
            return {kind for name, _, kind in children(cluster, namespace) if name == "c"} == set(CHILD_KINDS)

        recovery = first_times(
            {
                "operator applied the changes": lambda: b_rerendered() and c_children(),
                "runner published the outage's progress": lambda: batch_status()["succeeded"] >= done_at_end,
                "gateway discovery up": lambda: gauge(gw.url, "sd_gateway_discovery_up") == 1,
            },
            restarted,
            timeout=120,
        )
        wait_control_plane_settled(cluster)
        settled = True

        # -- converged: the operator, the same process, with one child of each kind per instance -------------
        assert op.process.poll() is None and op.process.pid == operator_pid
        for name in ("a", "b", "c"):
            wait_phase(custom, namespace, name, "Ready", timeout=90)
        uids = {name: get(custom, namespace, name)["metadata"]["uid"] for name in ("a", "b", "c")}
        assert children(cluster, namespace) == Counter(
            {(name, uid, kind): 1 for name, uid in uids.items() for kind in CHILD_KINDS}
        )

        def b_rolled_out() -> bool:
            pods = cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/instance=b").items
            return len(pods) == 1 and "--no-hashing" in (pods[0].spec.containers[0].args or [])

        wait_for(b_rolled_out, timeout=90, what="b's one pod to run the new arguments")
        assert get(custom, namespace, "b")["status"]["ready"] == "1/1"
        assert not cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/instance=c").items

        # The gateway follows what changed after the outage (b's new pod), and kept answering throughout.
        # The gateway follows what changes after the outage: a slice added for c (a fictitious pod IP, never
        # contacted: c has no pods and nothing asks for its model).
        client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(namespace, {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "c-by-hand", "labels": {"kubernetes.io/service-name": "c-webui",
                                                         "sd-operator.dev/instance": "c"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.9.9"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 7861, "protocol": "TCP"}],
        })  # fmt: skip
        wait_for(
            lambda: "http://10.244.9.9:7861" in listed() and listed() == emulator_urls | slice_urls(),
            timeout=60,
            what="the gateway to follow the EndpointSlices",
        )
        stop_traffic.set()
        sender.join(timeout=35)
        assert codes and set(codes) == {200}, {code: codes.count(code) for code in set(codes)}

        # The batch: done, every item once, each rendered once, and the status says so.
        assert runner.wait(timeout=OUTAGE_SECONDS + 120) == 0, runner_log.read_text()[-3000:]
        found = sidecars(out)
        assert sorted(found) == list(range(ITEMS)) and set(found.values()) == {1}
        assert len(list(out.glob("*.png"))) == ITEMS
        assert generations(batch_emus) == ITEMS, "an item was rendered twice"
        final = batch_status()
        assert (final["total"], final["succeeded"], final["failed"], final["running"]) == (ITEMS, ITEMS, 0, 0)
        assert final["progress"] == f"{ITEMS}/{ITEMS}"

        # Logs: the runner said once that publishing failed and once that it worked again.
        runner_text = runner_log.read_text()
        lost = [line for line in runner_text.splitlines() if "could not publish progress" in line]
        back = [line for line in runner_text.splitlines() if "progress published again after" in line]
        assert len(lost) == 1 and "will retry, the work goes on" in lost[0], lost
        assert len(back) == 1, back
        assert [line for line in runner_text.splitlines() if " WARNING " in line] == lost
        # The operator: no traceback, and a bounded number of error lines (kopf's retries of its watches).
        records = own_records(op.log(), namespace)
        tracebacks = [r for r in records if "Traceback" in r]
        assert not tracebacks, tracebacks[0][-3000:]
        errors = [r for r in records if " ERROR " in r.split("\n", 1)[0]]
        assert len(errors) <= MAX_OPERATOR_ERROR_RECORDS, len(errors)
        assert "Traceback" not in gw.log.read_text()
        print(
            f"\n{component} stopped {OUTAGE_SECONDS:.0f}s: first write taken {writable}s after the restart; recovered "
            f"after (s from restart) {recovery}; "
            f"rendered during the outage {rendered_in_outage} items, {requests_in_outage} probe requests; "
            f"batch {ITEMS} items, {generations(batch_emus)} renders; operator log {len(errors)} error records "
            f"of {len(records)}; runner: {lost[0].split('batch ', 1)[-1]} / "
            f"{back[0].split('batch ', 1)[-1]}"
        )
    finally:
        stop_traffic.set()
        if not settled:  # failed in between: the next test must still meet a recovered cluster
            wait_control_plane_settled(cluster)
        # The batch goes before the operator stops (with its Job): a Job deleted later with the namespace
        # would look to the next test's operator like an unfinished Job deleted by hand, to start again.
        with contextlib.suppress(Exception):
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "generationbatches", "outage")
            wait_for(lambda: not cluster.batch.list_namespaced_job(namespace).items, timeout=30, what="the Job gone")
        if runner is not None and runner.poll() is None:
            runner.kill()
            runner.wait()
        stop_operator(op)
        for p in procs:
            p.stop()


def unreachable_kubeconfig(path: Path) -> Path:
    """A kubeconfig naming an API server that is not there (a free port on 127.0.0.1: refused)."""
    server = f"https://127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "gone", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone"}}],
    }))  # fmt: skip
    return path


def test_runner_without_an_api_server_renders_everything_and_gives_up_publishing_at_its_bound(
    tmp_path: Path,
) -> None:
    """The API server is away for the whole run: the work is done all the same; the last counts are tried
    for --final-publish-timeout (for at most 15 s after SIGTERM: the pod's grace period is 30 s), then the
    run ends with the work's exit code."""
    emu = emulator(tmp_path, "e", BATCH_MODEL)
    gw = gateway(tmp_path, [emu])
    try:
        env = {**os.environ, "KUBECONFIG": str(unreachable_kubeconfig(tmp_path / "kubeconfig"))}
        doc = {**batch_object("away"), "metadata": {"name": "away", "namespace": "tests", "uid": "u-away"}}
        (tmp_path / "batch.json").write_text(json.dumps(doc))

        def runner(n: int, *flags: str) -> tuple[list[str], Path]:
            items = tmp_path / f"items-{n}.jsonl"
            items.write_text(
                "".join(json.dumps({"prompt": f"p {i}", "width": 64, "height": 64}) + "\n" for i in range(n))
            )
            out = tmp_path / f"out-{n}"
            return [str(BIN / "sd-operator"), "batch", "--batch-file", str(tmp_path / "batch.json"),
                    "--gateway-url", gw.url, "--report", "kubernetes", "--items-file", str(items),
                    "--output-dir", str(out), *flags], out  # fmt: skip

        cmd, out = runner(20, "--final-publish-timeout", "3")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(sidecars(out)) == list(range(20))
        warnings = [line for line in done.stderr.splitlines() if " WARNING " in line]
        assert len(warnings) == 2, warnings
        assert "could not publish progress: NewConnectionError" in warnings[0]
        assert "gave up publishing the final progress after 3s" in warnings[1]
        assert "all 20 finished items" in warnings[1]

        # Stopped by SIGTERM: 15 s for the last counts, although --final-publish-timeout is the default 300 s.
        cmd, out = runner(5000)
        log = tmp_path / "sigterm.log"
        with log.open("wb") as f:
            stopped = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: len(sidecars(out)) >= 5, timeout=60, what="some items rendered")
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=120) == 143
        text = log.read_text()
        assert "gave up publishing the final progress after 15s" in text, text[-3000:]
    finally:
        gw.stop()
        emu.stop()
