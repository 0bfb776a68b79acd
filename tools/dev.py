"""`make dev`: the whole product on this machine, from `kubectl apply` to PNGs on disk.

    python tools/dev.py [up]     # foreground; Ctrl-C stops everything
    python tools/dev.py down     # stops a session started elsewhere (`make dev-down`)

Inside a loopback-only network namespace (tools/netns.sh): the local cluster in runner mode (its GPU
nodes' pods run as processes at pod IPs that answer in there; tools/cluster/podrunner.py), the stand-in
model host (Hugging Face for the examples, through the operator's SD_HF_ENDPOINT), the operator and the
gateway run as the chart runs them, and the examples. From this machine, the API server and the
gateway are forwarded to 127.0.0.1 (tools/cluster/portforward.py), so kubectl and curl work here.

Settings (environment): SD_DEV_DIR (state, default .local), SD_DEV_PORT_BASE (the cluster's seven
ports, default 16440), SD_DEV_GATEWAY_PORT (default 18080), SD_DEV_EXAMPLES (space-separated files,
default examples/storage/*.yaml, then examples/*.yaml).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "cluster"))

import localcluster  # noqa: E402
from modelserver import stand_in_sha256  # noqa: E402

BIN = Path(sys.executable).parent
STATE = Path(os.environ.get("SD_DEV_DIR", ROOT / ".local")).resolve()
DEV = STATE / "dev"
PORT_BASE = int(os.environ.get("SD_DEV_PORT_BASE", "16440"))
GATEWAY_PORT = int(os.environ.get("SD_DEV_GATEWAY_PORT", "18080"))
READY_TIMEOUT = 600.0
# Claims the examples use, each bound to a folder under <state>/dev/volumes/<claim> so its files are
# easy to find from here (the batch example's PNGs land in sd-outputs).
DEV_CLAIMS = ("sd-outputs", "sd-model-cache", "lora-datasets", "lora-outputs")


def log(msg: str) -> None:
    print(f"dev: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Inside the namespace


class Session:
    def __init__(self) -> None:
        cfg = localcluster.ClusterConfig(
            workdir=STATE / "cluster",
            bindir=ROOT / ".local" / "bin",
            ports=localcluster.Ports.from_base(PORT_BASE),
            fleet_file=HERE / "cluster" / "fleet-local.yaml",
            runner=True,
        )
        self.cluster = localcluster.LocalCluster(cfg)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "KUBECONFIG": str(cfg.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input=input, check=check).stdout

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        (DEV / "logs").mkdir(parents=True, exist_ok=True)
        with open(DEV / "logs" / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def up(self) -> None:
        cfg = self.cluster.cfg
        # Every session starts from an empty cluster (objects of an earlier one would be rendered for
        # another gateway or node set); the claims' folders in <state>/dev/volumes stay.
        for stale in ("etcd", "runner"):
            shutil.rmtree(cfg.workdir / stale, ignore_errors=True)
        start = time.monotonic()
        self.cluster.up()
        log(f"cluster up in {time.monotonic() - start:.0f}s: nodes {', '.join(self.node_names())}")
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        gateway_url = f"http://127.0.0.1:{GATEWAY_PORT}"
        # As the chart runs them: the gateway discovers instances, the operator renders for this gateway.
        self.spawn(
            "gateway",
            [
                str(BIN / "sd-operator"),
                "gateway",
                "--host=127.0.0.1",
                f"--port={GATEWAY_PORT}",
                "--kubernetes",
                # Demand for the autoscaler (instances that sleep at zero), as the chart's default.
                "--report-demand",
                "--gateway-id=dev",
                "--demand-namespace=default",
            ],
            self.env,
        )
        self.spawn(
            "operator",
            [str(BIN / "sd-operator"), "run", "--all-namespaces", "--standalone"],
            {**self.env, "SD_HF_ENDPOINT": cfg.model_url, "SD_GATEWAY_URL": gateway_url},
        )
        self.storage()
        applied = self.apply_examples()
        names = [d["metadata"]["name"] for d in applied if d["kind"] == "SDInstance"]
        log(f"waiting for {len(names)} SDInstance(s) to be Ready: {', '.join(names)}")
        self.wait_ready(names)
        (DEV / "ready").write_text(json.dumps({"instances": names, "models": self.models(applied)}))
        print(self.kubectl("get", "sdinstances,lorajobs,generationbatches", "-A"), flush=True)

    def node_names(self) -> list[str]:
        out = self.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}")
        return out.split()

    def storage(self) -> None:
        """PersistentVolumes in folders of <state>/dev/volumes, pre-bound to the examples' claims, and a
        small dataset for the LoRA example."""
        pvs = []
        for claim in DEV_CLAIMS:
            folder = DEV / "volumes" / claim
            folder.mkdir(parents=True, exist_ok=True)
            pvs.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"dev-{claim}"},
                    "spec": {
                        "capacity": {"storage": "100Gi"},
                        "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": "local",
                        "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                        "claimRef": {"namespace": "default", "name": claim},
                    },
                }
            )
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(pvs))
        seed_dataset(DEV / "volumes" / "lora-datasets" / "mystyle" / "100_mystyle style")

    def apply_examples(self) -> list[dict[str, Any]]:
        examples = ROOT / "examples"
        # The claims first (examples/storage/), then the custom resources.
        default = [str(p) for p in sorted(examples.glob("storage/*.yaml")) + sorted(examples.glob("*.yaml"))]
        files = os.environ.get("SD_DEV_EXAMPLES", "").split() or default
        docs: list[dict[str, Any]] = []
        for path in files:
            for doc in yaml.safe_load_all(Path(path).read_text()):
                if not doc:
                    continue
                reason = local_blocker(doc)
                if reason:
                    log(f"skipped {doc['kind']} {doc['metadata']['name']} ({Path(path).name}): {reason}")
                    continue
                docs.append(for_stand_in_models(doc))
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        log(f"applied {len(docs)} object(s) from {len(files)} example file(s)")
        return docs

    def wait_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            out = json.loads(self.kubectl("get", "sdinstances", "-n", "default", "-o", "json"))
            phases = {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in out["items"]}
            if all(phases.get(n) == "Ready" for n in names):
                return
            for name in ("operator", "gateway"):
                if self.procs[name].poll() is not None:
                    raise SystemExit(f"dev: the {name} exited; see {DEV / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise SystemExit(f"dev: instances not Ready after {READY_TIMEOUT:.0f}s: {phases}")
            time.sleep(1)

    @staticmethod
    def models(docs: list[dict[str, Any]]) -> list[str]:
        return [d["spec"]["model"]["checkpoint"]["name"] for d in docs if d["kind"] == "SDInstance"]

    def down(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            stop_group(proc, timeout=30)
            log(f"stopped the {name}")
        self.cluster.down()
        log("cluster down")


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to the process's group, SIGKILL after `timeout` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def local_blocker(doc: dict[str, Any]) -> str | None:
    """Why an example cannot run on this machine (it needs a service that is not here), or None."""
    output = (doc.get("spec") or {}).get("output") or {}
    if "s3" in output or "s3" in (output.get("destination") or {}):
        return "writes to an S3 endpoint, which the local cluster does not have"
    return None


def for_stand_in_models(doc: dict[str, Any]) -> dict[str, Any]:
    """The stand-in host serves made-up files: a declared checksum is replaced by the stand-in's, so the
    fetcher still verifies every download."""
    if doc.get("kind") != "SDInstance":
        return doc
    model = doc["spec"]["model"]
    parts = [model.get("checkpoint"), model.get("vae"), *(model.get("loras") or []), *(model.get("controlNets") or [])]
    for part in parts:
        if part and part.get("sha256"):
            part["sha256"] = stand_in_sha256(part["name"])
    return doc


def seed_dataset(folder: Path) -> None:
    """A few images with captions, as the LoRA example's dataset folder expects."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        image = folder / f"{i:02d}.png"
        if not image.exists():
            Image.new("RGB", (1024, 1024), (40 * i, 120, 255 - 40 * i)).save(image)
            (folder / f"{i:02d}.txt").write_text(f"mystyle style, sample {i}\n")


def inside() -> int:
    """The namespace's side: everything runs here; a signal stops it all."""
    (DEV / "netns.pid").write_text(str(os.getpid()))
    session = Session()
    stopping = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        session.up()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        session.down()
    return 0


# ---------------------------------------------------------------------------------------------
# On this machine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def commands(ready: dict[str, Any]) -> str:
    kubeconfig = STATE / "cluster" / "kubeconfig"
    kubectl = f"{ROOT / '.local/bin/kubectl'} --kubeconfig {kubeconfig}"
    model = ready["models"][0] if ready["models"] else "MODEL"
    body = json.dumps(
        {"prompt": "a lighthouse on a cliff at dusk", "steps": 20, "override_settings": {"sd_model_checkpoint": model}}
    )
    decode = (
        "import sys,json,base64; open('txt2img.png','wb').write(base64.b64decode(json.load(sys.stdin)['images'][0]))"
    )
    batch = ROOT / "examples" / "dev" / "generationbatch-quick.yaml"
    outputs = DEV / "volumes/sd-outputs/batches/quick-look"
    wait = "--for=jsonpath='{.status.phase}'=Succeeded --timeout=300s"
    return f"""
Everything runs. From any terminal on this machine:

  # 1. the resources
  {kubectl} get sdinstances,lorajobs,generationbatches,pods -A

  # 2. a txt2img request through the gateway (forwarded to 127.0.0.1:{GATEWAY_PORT}), saved as txt2img.png
  curl -s http://127.0.0.1:{GATEWAY_PORT}/sdapi/v1/txt2img -H 'Content-Type: application/json' \\
    -d '{body}' | python3 -c "{decode}" && echo wrote txt2img.png

  # 3. a small GenerationBatch; its PNGs and JSON sidecars land in {outputs}
  {kubectl} apply -f {batch} && \\
    {kubectl} wait generationbatch/quick-look {wait} && ls {outputs}

Logs: {DEV / "logs"} (operator, gateway), {STATE / "cluster/logs"} (control plane, pod runner),
{STATE / "cluster/runner/logs/pods"} (each pod's containers). Ctrl-C here (or `make dev-down`) stops everything.
"""


def up() -> int:
    DEV.mkdir(parents=True, exist_ok=True)
    pid_file = DEV / "dev.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"dev: a session runs already (pid {pid_file.read_text()}); `make dev-down` stops it", file=sys.stderr)
        return 1
    for stale in ("ready", "netns.pid"):
        (DEV / stale).unlink(missing_ok=True)
    pid_file.write_text(str(os.getpid()))
    inner = subprocess.Popen(
        [str(ROOT / "tools/netns.sh"), sys.executable, str(Path(__file__).resolve()), "inside"],
        start_new_session=True,  # it gets the stop signal from here, once, and stops in order
        env={k: v for k, v in os.environ.items() if k != "SD_NETNS"},
    )
    forward: subprocess.Popen[bytes] | None = None
    interrupted = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not interrupted and inner.poll() is None:
            if forward is None and (DEV / "netns.pid").exists():
                # `unshare` itself (our child) joined the network namespace before forking its command.
                netns = f"/proc/{inner.pid}/ns/net"
                apiserver = PORT_BASE + 2
                forward = subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "cluster" / "portforward.py"),
                        f"--netns={netns}",
                        f"{apiserver}=127.0.0.1:{apiserver}",
                        f"{GATEWAY_PORT}=127.0.0.1:{GATEWAY_PORT}",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            if (DEV / "ready").exists():
                print(commands(json.loads((DEV / "ready").read_text())), flush=True)
                (DEV / "ready").rename(DEV / "ready.shown")
            time.sleep(0.3)
    finally:
        stop_group(inner, timeout=120)
        if forward is not None:
            forward.terminate()
            forward.wait()
        for name in ("dev.pid", "netns.pid", "ready", "ready.shown"):
            (DEV / name).unlink(missing_ok=True)
    log("stopped; nothing left running")
    return 0 if interrupted else (inner.returncode or 0)


def down() -> int:
    pid_file = DEV / "dev.pid"
    if not pid_file.exists() or not _alive(int(pid_file.read_text())):
        log("no session runs")
        return 0
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 150
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        print(f"dev: pid {pid} did not stop", file=sys.stderr)
        return 1
    log("the session stopped")
    return 0


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else "up"
    sys.exit({"up": up, "down": down, "inside": inside}[action]())
