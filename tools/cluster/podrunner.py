"""The local pod runner: a kubelet stand-in that runs the pods of its nodes as local processes.

    python podrunner.py --kubeconfig K --workdir DIR --apiserver 127.0.0.1:PORT [--ip-range CIDR]

Under kwok a pod becomes Running without anything running. The nodes annotated
`local.sd-operator.dev/runner=true` are not kwok's (kwok manages only `kwok.x-k8s.io/node=fake` nodes,
so it never touches their pods); this process keeps them Ready (node status and Lease, as a kubelet)
and runs their pods: init containers in order, then the containers, each as a process started by
podexec.py with the pod's volumes at their mount paths, its command/args/env (`$(VAR)` expanded), its
image mapped to a local program (images.yaml), bound to the pod's IP. That IP comes from --ip-range and
is added to `lo`, so EndpointSlices carry addresses that answer. It reports what a kubelet reports:
phase, conditions, container states with exit codes and termination messages, restarts with back-off,
probe results; and on deletion it stops the containers within the grace period (each one's preStop hook
first, then SIGTERM with what is left of it, then SIGKILL), then removes the pod.
It also provisions PersistentVolumes (a folder each) for claims of the `local` StorageClass.

It refuses to run outside a loopback-only network namespace (tools/netns.sh): pod IPs must never be
added to a machine's real interfaces. Dev tooling only: not part of any image.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from localcluster import loopback_only
from podplan import (
    Hook,
    PodError,
    Program,
    condition,
    container_argv,
    container_env,
    field_ref,
    gpu_profile,
    grace_period,
    image_program,
    pre_stop_hook,
    probe_address,
    remaining_grace,
    termination_message,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUNNER_ANNOTATION = "local.sd-operator.dev/runner"
PROVISIONER = "local.sd-operator.dev/runner"
STORAGE_CLASS = "local"
NODE_LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10
BACKOFF_START, BACKOFF_MAX = 10.0, 300.0  # the kubelet's CrashLoopBackOff
PATCH = "application/merge-patch+json"

log = logging.getLogger("podrunner")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Deleted(Exception):
    """The pod is being deleted (or is gone): unwind and stop its processes."""


class IPPool:
    """Pod addresses from a range, added to and removed from `lo`."""

    def __init__(self, cidr: str):
        self.hosts = ipaddress.ip_network(cidr).hosts()
        self.free: list[str] = []
        self.lock = threading.Lock()

    def take(self) -> str:
        with self.lock:
            ip = self.free.pop(0) if self.free else str(next(self.hosts))
        subprocess.run(["ip", "addr", "replace", f"{ip}/32", "dev", "lo"], check=True, capture_output=True)
        return ip

    def give_back(self, ip: str) -> None:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], check=False, capture_output=True)
        with self.lock:
            self.free.append(ip)


class RunnerConfig:
    def __init__(self, args: argparse.Namespace):
        self.workdir: Path = args.workdir.resolve()
        self.apiserver_host, port = args.apiserver.rsplit(":", 1)
        self.apiserver_port = int(port)
        self.images: list[dict[str, Any]] = yaml.safe_load(args.images.read_text())["images"]
        self.bin = Path(sys.executable).parent
        self.emulator_time_scale = str(args.emulator_time_scale)
        self.max_probe_period = args.max_probe_period


class Runner:
    def __init__(self, cfg: RunnerConfig, api: client.ApiClient, ips: IPPool):
        self.cfg, self.api, self.ips = cfg, api, ips
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.nodes: dict[str, dict[str, str]] = {}  # name -> labels
        self.server_version = ""
        self.workers: dict[str, PodWorker] = {}
        self.stopping = threading.Event()

    # -- nodes -------------------------------------------------------------------------------

    def refresh_nodes(self) -> None:
        nodes = self.core.list_node().items
        self.nodes = {
            n.metadata.name: dict(n.metadata.labels or {})
            for n in nodes
            if (n.metadata.annotations or {}).get(RUNNER_ANNOTATION) == "true"
        }

    def heartbeat(self) -> None:
        """Node Ready and a renewed Lease, as a kubelet reports every 10 s."""
        version = self.server_version
        for name in list(self.nodes):
            stamp = now()
            conditions = [
                {"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": m}
                for t, r, m in (
                    ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                    ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                    ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"),
                )
            ]
            conditions.append(
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local pod runner is ready"}
            )
            for c in conditions:
                c.update({"lastHeartbeatTime": stamp, "lastTransitionTime": stamp})
            status = {
                "conditions": conditions,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
                "nodeInfo": {
                    "kubeletVersion": version,
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "local://podrunner",
                    "osImage": "sd-operator local pod runner",
                    "kernelVersion": os.uname().release,
                    "machineID": name,
                    "systemUUID": name,
                    "bootID": name,
                },
            }
            previous = self.core.read_node_status(name).status
            for c in conditions:  # transition times stay while the status stays
                old = next((o for o in previous.conditions or [] if o.type == c["type"]), None)
                if old is not None and old.status == c["status"] and old.last_transition_time:
                    c["lastTransitionTime"] = old.last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
            self.core.patch_node_status(name, {"status": status}, _content_type=PATCH)
            self.renew_lease(name)

    def renew_lease(self, node: str) -> None:
        body = {
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": NODE_LEASE_SECONDS, "renewTime": micro_now()},
        }
        try:
            self.coord.patch_namespaced_lease(node, "kube-node-lease", body, _content_type=PATCH)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    def node_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.refresh_nodes()
                self.heartbeat()
                self.provision()
            except Exception:  # keep beating: one failed round is retried next time
                log.exception("node heartbeat failed")
            self.stopping.wait(HEARTBEAT_SECONDS if self.nodes else 1)

    # -- volumes -----------------------------------------------------------------------------

    def provision(self) -> None:
        """A folder-backed PersistentVolume for each pending claim of the `local` class; released
        volumes are deleted with their folder (reclaim policy Delete)."""
        volumes = self.core.list_persistent_volume().items
        # Claims a volume was made for already (by this runner, or by hand, pre-bound) bind to that one.
        claimed = {(v.spec.claim_ref.namespace, v.spec.claim_ref.name) for v in volumes if v.spec.claim_ref}
        for pvc in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if pvc.status.phase != "Pending" or pvc.spec.storage_class_name != STORAGE_CLASS or pvc.spec.volume_name:
                continue
            if (pvc.metadata.namespace, pvc.metadata.name) in claimed:
                continue
            name = f"pvc-{pvc.metadata.uid}"
            path = self.cfg.workdir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            pv = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": pvc.spec.resources.requests.get("storage", "1Gi")},
                    "accessModes": pvc.spec.access_modes or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {
                        "namespace": pvc.metadata.namespace,
                        "name": pvc.metadata.name,
                        "uid": pvc.metadata.uid,
                    },
                },
            }
            with contextlib.suppress(ApiException):  # already made: the PV controller binds it
                self.core.create_persistent_volume(pv)
                log.info("provisioned %s for %s/%s at %s", name, pvc.metadata.namespace, pvc.metadata.name, path)
        for pv in volumes:
            ours = (pv.metadata.annotations or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
            if ours and pv.status.phase in ("Released", "Failed") and pv.spec.host_path:
                shutil.rmtree(pv.spec.host_path.path, ignore_errors=True)
                with contextlib.suppress(ApiException):
                    self.core.delete_persistent_volume(pv.metadata.name)

    def read_keys(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        """A ConfigMap's (data and binaryData) or Secret's keys as the bytes a volume holds; None if missing."""
        try:
            if kind == "configmap":
                cm = self.core.read_namespaced_config_map(name, namespace)
                keys = {k: v.encode("utf-8") for k, v in (cm.data or {}).items()}
                keys.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
                return keys
            secret = self.core.read_namespaced_secret(name, namespace)
            return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        """The same keys as text, for environment variables."""
        keys = self.read_keys(kind, namespace, name)
        return None if keys is None else {k: v.decode("utf-8", "replace") for k, v in keys.items()}

    # -- pods --------------------------------------------------------------------------------

    def run(self) -> None:
        # Reported as the nodes' kubelet version (asked once: it does not change while this runs).
        self.server_version = str(client.VersionApi(self.api).get_code().git_version)
        self.refresh_nodes()
        threading.Thread(target=self.node_loop, name="nodes", daemon=True).start()
        while not self.stopping.is_set():
            try:
                self.watch_pods()
            except Exception:
                log.exception("pod watch failed; listing again")
                self.stopping.wait(1)

    def watch_pods(self) -> None:
        listing = self.core.list_pod_for_all_namespaces()
        for pod in listing.items:
            self.dispatch("ADDED", self.api.sanitize_for_serialization(pod))
        w = watch.Watch()
        for event in w.stream(
            self.core.list_pod_for_all_namespaces,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=300,
            allow_watch_bookmarks=True,
        ):
            if self.stopping.is_set():
                w.stop()
                return
            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                self.dispatch(event["type"], self.api.sanitize_for_serialization(event["object"]))

    def dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is None:
            if kind == "DELETED" or pod["spec"].get("nodeName") not in self.nodes:
                return
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return  # finished before this runner started
            worker = self.workers[uid] = PodWorker(self, pod)
            worker.start()
        worker.update(pod, gone=kind == "DELETED")

    def forget(self, uid: str) -> None:
        self.workers.pop(uid, None)

    def stop(self) -> None:
        """Stops every container (SIGTERM, then SIGKILL after a few seconds) and removes the addresses."""
        self.stopping.set()
        workers = list(self.workers.values())
        for w in workers:
            w.shutdown.set()
            w.changed.set()
        for w in workers:
            w.join(timeout=15)


class Container:
    """One container of a pod: its process, restarts, probes and status."""

    def __init__(self, worker: PodWorker, spec: dict[str, Any], init: bool):
        self.worker, self.spec, self.init = worker, spec, init
        self.name = spec["name"]
        self.restart_count = 0
        self.state: dict[str, Any] = {"waiting": {"reason": "PodInitializing" if init else "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.started = False
        self.next_start = 0.0
        self.backoff = BACKOFF_START
        self.probes: dict[str, dict[str, Any]] = {}
        self.dir = worker.dir / "containers" / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = worker.logs / f"{self.name}.log"
        self.log_start = 0
        self.termlog = self.dir / "termination-log"

    def start(self) -> None:
        w = self.worker
        program, env = w.program_env(self.spec)
        argv = container_argv(self.spec, program, env)
        self.termlog.write_text("")
        mounts = [*w.mounts(self.spec)]
        mounts.append(
            {"source": str(self.termlog), "target": self.spec.get("terminationMessagePath") or "/dev/termination-log"}
        )
        root = self.dir / "root"
        root.mkdir(exist_ok=True)
        spec = {
            "root": str(root),
            "mounts": mounts,
            "argv": argv,
            "env": env,
            "workingDir": self.spec.get("workingDir"),
            "keep": sorted({str(REPO), sys.prefix, sys.base_prefix}),
        }
        spec_path = self.dir / "exec.json"
        spec_path.write_text(json.dumps(spec))
        with open(self.log_path, "ab") as out:
            out.write(f"--- {now()} start {self.name}: {' '.join(argv)}\n".encode())
            out.flush()
            self.log_start = out.tell()  # this run's output starts here (the file keeps earlier runs')
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "podexec.py"), str(spec_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.state = {"running": {"startedAt": now()}}
        self.started = "startupProbe" not in self.spec
        self.ready = False
        self.probes = {}
        log.info("%s: started %s (pid %s)", w.key, self.name, self.proc.pid)

    def poll(self) -> int | None:
        """The exit code once the process ended (and records the terminated state), else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        code = 128 - code if code < 0 else code  # killed by a signal: 128+N, as a runtime reports
        self.proc = None
        started = (self.state.get("running") or {}).get("startedAt") or now()
        message = termination_message(
            self.termlog.read_text(errors="replace") if self.termlog.exists() else "",
            self._log_tail(),
            self.spec.get("terminationMessagePolicy"),
            code,
        )
        term = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
        }
        if message:
            term["message"] = message
        self.state = {"terminated": term}
        self.ready = False
        log.info("%s: %s exited with %s", self.worker.key, self.name, code)
        return code

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(self.log_start, f.tell() - 16384))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def schedule_restart(self) -> None:
        """CrashLoopBackOff: the last run becomes lastState; the next start waits, doubling up to 5 min."""
        self.last_state = self.state
        self.restart_count += 1
        delay = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.next_start = time.monotonic() + delay
        self.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {int(delay)}s restarting failed container={self.name} pod={self.worker.name}",
            }
        }

    def terminate(self, grace: float) -> None:
        """As the kubelet kills a container: its preStop hook first, for at most `grace` seconds, then
        SIGTERM with what is left of the grace period (at least 2 s), then SIGKILL. A hook that fails or
        overruns is logged and the container stops all the same."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop(remaining_grace(grace, 0.0))
            return
        started = time.monotonic()
        if grace > 0:
            self.run_pre_stop(grace)
        self.stop(remaining_grace(grace, time.monotonic() - started))

    def run_pre_stop(self, grace: float) -> None:
        key = f"{self.worker.key}: {self.name}"
        try:
            hook = pre_stop_hook(self.spec, self.worker.ip or "127.0.0.1")
        except PodError as e:
            log.warning("%s: preStop hook not run: %s", key, e)
            return
        if hook is None:
            return
        what = hook.url or " ".join(hook.command) or f"sleep {hook.seconds:g}s"
        log.info("%s: preStop %s %s (at most %.0fs)", key, hook.kind, what, grace)
        started = time.monotonic()
        # As the kubelet: the hook runs aside and is waited for at most `grace` seconds, whatever it does.
        result: list[tuple[str, bool]] = []
        runner = threading.Thread(
            target=lambda: result.append(self._run_hook(hook, grace)), name=f"prestop-{key}", daemon=True
        )
        runner.start()
        runner.join(grace)
        outcome, failed = result[0] if result else (f"still running after {grace:g}s", True)
        took = time.monotonic() - started
        if failed:
            log.warning("%s: preStop hook failed after %.1fs (%s); stopping it anyway", key, took, outcome)
        else:
            log.info("%s: preStop hook done in %.1fs: %s", key, took, outcome)

    def _run_hook(self, hook: Hook, grace: float) -> tuple[str, bool]:
        """(outcome, failed) of running `hook`."""
        try:
            if hook.kind == "httpGet":
                r = requests.get(hook.url, headers=hook.headers, timeout=grace)
                return f"HTTP {r.status_code} {r.text.strip()[:300]}", not 200 <= r.status_code < 400
            if hook.kind == "exec":
                done = self.run_in_container(hook.command, "prestop.json", timeout=grace)
                return f"exit code {done.returncode}", done.returncode != 0
            time.sleep(min(hook.seconds, grace))
            return "slept", False
        except (OSError, requests.RequestException, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}", True

    def run_in_container(self, argv: list[str], name: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """`argv` in the container's view (its mounts, environment and working folder), like `kubectl exec`."""
        run_spec = json.loads((self.dir / "exec.json").read_text())
        run_spec["argv"] = argv
        path = self.dir / name
        path.write_text(json.dumps(run_spec))
        return subprocess.run(
            [sys.executable, str(HERE / "podexec.py"), str(path)],
            check=False,
            capture_output=True,
            timeout=timeout,
        )

    def stop(self, grace: float) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.poll()

    # -- probes ------------------------------------------------------------------------------

    def probe(self) -> str | None:
        """Runs due probes; returns "restart" when the startup or liveness probe gave up."""
        if self.proc is None:
            return None
        kinds = ["startupProbe"] if not self.started else ["livenessProbe", "readinessProbe"]
        for kind in kinds:
            probe = self.spec.get(kind)
            if not probe:
                if kind == "readinessProbe":
                    self.ready = True
                continue
            st = self.probes.setdefault(kind, {"next": 0.0, "ok": 0, "bad": 0, "first": True})
            if time.monotonic() < st["next"]:
                continue
            cap = self.worker.runner.cfg.max_probe_period
            if st["first"]:
                st["first"] = False
                st["next"] = time.monotonic() + min(float(probe.get("initialDelaySeconds", 0)), cap)
                if st["next"] > time.monotonic():
                    continue
            st["next"] = time.monotonic() + min(float(probe.get("periodSeconds", 10)), cap)
            ok = self._run_probe(probe)
            st["ok"], st["bad"] = (st["ok"] + 1, 0) if ok else (0, st["bad"] + 1)
            if kind == "startupProbe":
                if ok:
                    self.started = True
                elif st["bad"] >= int(probe.get("failureThreshold", 3)):
                    return "restart"
            elif kind == "livenessProbe":
                if st["bad"] >= int(probe.get("failureThreshold", 3)):
                    return "restart"
            elif ok and st["ok"] >= int(probe.get("successThreshold", 1)):
                self.ready = True
            elif not ok and st["bad"] >= int(probe.get("failureThreshold", 3)):
                self.ready = False
        return None

    def _run_probe(self, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            kind, target, port = probe_address(probe, self.spec, self.worker.ip)
            if kind == "httpGet":
                headers = {h["name"]: h["value"] for h in probe["httpGet"].get("httpHeaders") or []}
                return 200 <= requests.get(target, headers=headers, timeout=timeout).status_code < 400
            if kind in ("tcpSocket", "grpc"):
                with socket.create_connection((target, port), timeout=timeout):
                    return True
            # exec: the command in the container's view, like `kubectl exec`
            return self.run_in_container(target, "probe.json", timeout=timeout + 5).returncode == 0
        except (OSError, requests.RequestException, subprocess.TimeoutExpired, PodError):
            return False

    def status(self) -> dict[str, Any]:
        def full(state: dict[str, Any]) -> dict[str, Any]:
            # JSON merge patch: a state that ended must be removed explicitly.
            return {k: state.get(k) for k in ("waiting", "running", "terminated")}

        proc = self.proc
        return {
            "name": self.name,
            "image": self.spec["image"],
            "imageID": f"local://{self.spec['image']}",
            "containerID": f"local://{proc.pid}" if proc else None,
            "ready": self.ready and proc is not None,
            "started": self.started and proc is not None,
            "restartCount": self.restart_count,
            "state": full(self.state),
            "lastState": full(self.last_state) if self.last_state else {},
        }


class PodWorker(threading.Thread):
    """Runs one pod from its first sight on this runner's node until it is deleted."""

    def __init__(self, runner: Runner, pod: dict[str, Any]):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner, self.pod = runner, pod
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta["namespace"]
        self.key = f"{self.namespace}/{self.name}"
        self.dir = runner.cfg.workdir / "pods" / self.uid
        self.logs = runner.cfg.workdir / "logs" / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.changed = threading.Event()
        self.shutdown = threading.Event()
        self.gone = False
        self.ip = ""
        self.volumes: dict[str, str] = {}
        self.start_time = now()
        spec = pod["spec"]
        self.init_containers = [Container(self, c, True) for c in spec.get("initContainers") or []]
        self.containers = [Container(self, c, False) for c in spec.get("containers") or []]
        self.phase = "Pending"
        self.initialized = not self.init_containers
        self.problem: tuple[str, str] | None = None
        self.published: dict[str, Any] | None = None

    def update(self, pod: dict[str, Any], gone: bool) -> None:
        self.pod = pod
        self.gone = self.gone or gone
        self.changed.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.prepare()
            self.run_init_containers()
            self.run_containers()
        except Deleted:
            self.teardown()
        except Exception:
            # A bug of this runner, not the pod's failure: stop its processes but leave the pod to be
            # looked at (deleting it would only make its controller start another one the same way).
            log.exception("%s: runner failure; the pod is left as it is", self.key)
            for c in self.init_containers + self.containers:
                c.stop(5)
            self.runner.forget(self.uid)

    def check(self) -> None:
        if self.gone or self.shutdown.is_set() or self.pod["metadata"].get("deletionTimestamp"):
            raise Deleted

    def wait(self, seconds: float) -> None:
        self.changed.wait(seconds)
        self.changed.clear()
        self.check()

    def prepare(self) -> None:
        """The pod's address and volumes; a missing ConfigMap or claim is retried like a kubelet."""
        spec = self.pod["spec"]
        self.ip = "127.0.0.1" if spec.get("hostNetwork") else self.runner.ips.take()
        while True:
            self.check()
            try:
                self.volumes = self.make_volumes()
                self.problem = None
                return
            except PodError as e:
                self.problem = (e.reason, str(e))
                self.publish()
                self.wait(2)

    def run_init_containers(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in self.init_containers:
            while True:
                self.check()
                if c.proc is None and time.monotonic() >= c.next_start:
                    self.start_container(c)
                code = c.poll()
                if code == 0:
                    break
                if code is not None:
                    if policy == "Never":
                        self.finish("Failed")
                        return
                    c.schedule_restart()
                self.publish()
                self.wait(0.5)
            self.publish()
        self.initialized = True

    def run_containers(self) -> None:
        if self.phase == "Failed":
            self.idle_until_deleted()
            return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in self.containers:
            self.start_container(c)
        self.phase = "Running"
        while True:
            self.check()
            for c in self.containers:
                code = c.poll()
                if code is not None and (policy == "Always" or (policy == "OnFailure" and code != 0)):
                    c.schedule_restart()
                if c.proc is None and "waiting" in c.state and time.monotonic() >= c.next_start:
                    self.start_container(c)
                if c.probe() == "restart":  # the kubelet runs the preStop hook here too
                    c.terminate(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                    c.schedule_restart()
            if all(c.proc is None and "terminated" in c.state for c in self.containers):
                ok = all(c.state["terminated"]["exitCode"] == 0 for c in self.containers)
                self.finish("Succeeded" if ok else "Failed")
                self.idle_until_deleted()
                return
            self.publish()
            self.wait(0.5)

    def start_container(self, c: Container) -> None:
        try:
            c.start()
        except PodError as e:
            c.state = {"waiting": {"reason": e.reason, "message": str(e)}}
            c.next_start = time.monotonic() + 5
            log.warning("%s: %s cannot start: %s", self.key, c.name, e)

    def finish(self, phase: str) -> None:
        self.phase = phase
        self.publish()
        if self.ip and self.ip != "127.0.0.1":
            self.runner.ips.give_back(self.ip)
            self.ip = ""

    def idle_until_deleted(self) -> None:
        while True:
            self.wait(5)

    def teardown(self) -> None:
        """Stops the processes within the grace period, then removes the pod (as a kubelet) and its folders."""
        grace = grace_period(self.pod)
        if self.runner.stopping.is_set():
            grace = min(grace, 5)
        # As the kubelet: all containers stop at once, each running its preStop hook before its SIGTERM.
        stopping = [
            threading.Thread(target=c.terminate, args=(grace,), name=f"stop-{self.key}/{c.name}", daemon=True)
            for c in self.init_containers + self.containers
            if c.proc is not None
        ]
        for t in stopping:
            t.start()
        for t in stopping:
            t.join()
        if self.ip and self.ip != "127.0.0.1":
            self.runner.ips.give_back(self.ip)
            self.ip = ""
        if not self.runner.stopping.is_set() and not self.gone:
            # As the kubelet: a deleted pod reaches a terminal phase first, so a controller that holds it
            # with a finalizer (the Job controller's job tracking) counts it and lets it go.
            if self.phase not in ("Succeeded", "Failed"):
                codes = [c.state.get("terminated", {}).get("exitCode") for c in self.containers]
                self.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
                with contextlib.suppress(ApiException, Deleted):
                    self.publish()
            with contextlib.suppress(ApiException):
                self.runner.core.delete_namespaced_pod(
                    self.name,
                    self.namespace,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
                    ),
                )
        if not self.runner.stopping.is_set():
            shutil.rmtree(self.dir, ignore_errors=True)  # emptyDirs go with the pod; claims and logs stay
        self.runner.forget(self.uid)

    # -- what the processes get --------------------------------------------------------------

    def program_env(self, spec: dict[str, Any]) -> tuple[Program, dict[str, str]]:
        cfg = self.runner.cfg
        node = self.pod["spec"].get("nodeName", "")
        values = {
            "python": sys.executable,
            "bin": str(cfg.bin),
            "repo": str(REPO),
            "pod_ip": self.ip or "127.0.0.1",
            "gpu_profile": gpu_profile(self.runner.nodes.get(node, {})),
            "emulator_time_scale": cfg.emulator_time_scale,
        }
        program = image_program(spec["image"], cfg.images, values)
        base = {
            "PATH": f"{cfg.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": self.name,
            "HOME": "/root",
            "KUBERNETES_SERVICE_HOST": cfg.apiserver_host,
            "KUBERNETES_SERVICE_PORT": str(cfg.apiserver_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(cfg.apiserver_port),
            "PYTHONUNBUFFERED": "1",
            **program.env,
        }
        pod = {**self.pod, "status": {**(self.pod.get("status") or {}), "podIP": self.ip, "hostIP": "127.0.0.1"}}
        return program, container_env(pod, spec, self.runner.lookup, base)

    def mounts(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for vm in spec.get("volumeMounts") or []:
            if vm["name"] not in self.volumes:
                raise PodError("CreateContainerConfigError", f"volume {vm['name']!r} not found")
            source = Path(self.volumes[vm["name"]])
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)  # the kubelet creates a missing subPath folder
            out.append({"source": str(source), "target": vm["mountPath"], "readOnly": bool(vm.get("readOnly"))})
        return out

    def make_volumes(self) -> dict[str, str]:
        volumes: dict[str, str] = {}
        root = self.dir / "volumes"
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            path = root / name
            if "emptyDir" in vol:
                path.mkdir(parents=True, exist_ok=True)
            elif "configMap" in vol or "secret" in vol:
                kind = "configmap" if "configMap" in vol else "secret"
                src = vol.get("configMap") or vol["secret"]
                ref = src.get("name") or src.get("secretName")
                self.write_keys(path, kind, ref, src.get("items"), bool(src.get("optional")))
            elif "projected" in vol:
                path.mkdir(parents=True, exist_ok=True)
                for source in vol["projected"].get("sources") or []:
                    self.project(path, source)
            elif "downwardAPI" in vol:
                path.mkdir(parents=True, exist_ok=True)
                self.project(path, {"downwardAPI": vol["downwardAPI"]})
            elif "persistentVolumeClaim" in vol:
                path = self.claim_path(vol["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
            else:
                raise PodError("FailedMount", f"volume {name!r}: the local runner does not support {sorted(vol)}")
            volumes[name] = str(path)
        return volumes

    def write_keys(self, path: Path, kind: str, name: str, items: list[dict] | None, optional: bool) -> None:
        data = self.runner.read_keys(kind, self.namespace, name)
        if data is None:
            if optional:
                path.mkdir(parents=True, exist_ok=True)
                return
            raise PodError("FailedMount", f'{kind} "{name}" not found')
        path.mkdir(parents=True, exist_ok=True)
        chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, rel in chosen.items():
            if key not in data:
                raise PodError("FailedMount", f'{kind} "{name}" has no key "{key}"')
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key])

    def project(self, path: Path, source: dict[str, Any]) -> None:
        if "serviceAccountToken" in source:
            tok = source["serviceAccountToken"]
            spec = client.V1TokenRequestSpec(
                audiences=[tok["audience"]] if tok.get("audience") else [],
                expiration_seconds=int(tok.get("expirationSeconds", 3607)),
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.name, uid=self.uid
                ),
            )
            sa = self.pod["spec"].get("serviceAccountName") or "default"
            answer = self.runner.core.create_namespaced_service_account_token(
                sa, self.namespace, client.AuthenticationV1TokenRequest(spec=spec)
            )
            (path / tok["path"]).write_text(answer.status.token)
        elif "configMap" in source or "secret" in source:
            kind = "configmap" if "configMap" in source else "secret"
            src = source.get("configMap") or source["secret"]
            self.write_keys(path, kind, src["name"], src.get("items"), bool(src.get("optional")))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                if "fieldRef" not in item:
                    raise PodError("FailedMount", "downwardAPI: only fieldRef items are supported locally")
                (path / item["path"]).write_text(field_ref(self.pod, item["fieldRef"]["fieldPath"]))
        else:
            raise PodError("FailedMount", f"projected source {sorted(source)} is not supported locally")

    def claim_path(self, claim: str) -> Path:
        try:
            pvc = self.runner.core.read_namespaced_persistent_volume_claim(claim, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise PodError("FailedMount", f'persistentvolumeclaim "{claim}" not found') from None
            raise
        if not pvc.spec.volume_name or pvc.status.phase != "Bound":
            raise PodError("FailedMount", f'persistentvolumeclaim "{claim}" is not bound')
        pv = self.runner.core.read_persistent_volume(pvc.spec.volume_name)
        if pv.spec.host_path is None:
            raise PodError("FailedMount", f"volume {pv.metadata.name} has no local folder (hostPath)")
        path = Path(pv.spec.host_path.path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- status ------------------------------------------------------------------------------

    def publish(self) -> None:
        """Writes the pod status when it changed (JSON merge patch of the status subresource)."""
        stamp = now()
        previous = list((self.pod.get("status") or {}).get("conditions") or [])
        mains = [c.status() for c in self.containers]
        all_ready = bool(mains) and all(c["ready"] for c in mains) and self.phase == "Running"
        ours = {"PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"}
        conditions = [c for c in previous if c.get("type") not in ours]
        conditions += [
            condition("PodReadyToStartContainers", bool(self.ip) or self.phase != "Pending", stamp, previous),
            condition("Initialized", self.initialized, stamp, previous, "ContainersNotInitialized"),
            condition("ContainersReady", all_ready, stamp, previous, "ContainersNotReady"),
            condition("Ready", all_ready, stamp, previous, "ContainersNotReady"),
        ]
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip or None,
            "podIPs": [{"ip": self.ip}] if self.ip else None,
            "startTime": self.start_time,
            "initContainerStatuses": [c.status() for c in self.init_containers] or None,
            "containerStatuses": mains,
        }
        if self.problem:
            for c in status["containerStatuses"]:
                if c["state"].get("waiting"):
                    c["state"]["waiting"] = {"reason": self.problem[0], "message": self.problem[1]}
        comparable = json.loads(json.dumps(status))
        for c in comparable["conditions"]:
            c.pop("lastTransitionTime", None)
        if comparable == self.published:
            return
        try:
            self.runner.core.patch_namespaced_pod_status(
                self.name, self.namespace, {"status": status}, _content_type=PATCH
            )
            self.published = comparable
        except ApiException as e:
            if e.status == 404:
                self.gone = True
                raise Deleted from None
            log.warning("%s: status update failed: %s", self.key, e.reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", type=Path, required=True, help="pods' folders, volumes and logs")
    parser.add_argument("--apiserver", required=True, help="host:port the pods reach the API server at")
    parser.add_argument("--ip-range", default="10.244.128.0/17", help="pod addresses (a part of the pod CIDR)")
    parser.add_argument("--images", type=Path, default=HERE / "images.yaml")
    parser.add_argument(
        "--emulator-time-scale",
        type=float,
        default=0.05,
        help="the WebUI emulator's time multiplier: 0.05 renders twenty times faster than the node's GPU would",
    )
    parser.add_argument(
        "--max-probe-period",
        type=float,
        default=1.0,
        help="probe at least this often (s): a local cluster need not wait a pod's 10 s periods",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not loopback_only():
        print(
            "podrunner: refusing to run outside a loopback-only network namespace "
            "(pod addresses would go on this machine's lo): start it through tools/netns.sh",
            file=sys.stderr,
        )
        return 2
    config.load_kube_config(args.kubeconfig)
    runner = Runner(RunnerConfig(args), client.ApiClient(), IPPool(args.ip_range))

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        runner.run()
    except KeyboardInterrupt:
        pass
    finally:
        runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
