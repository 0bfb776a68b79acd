"""Benchmark: a GenerationBatch runner against four emulated instances behind the gateway.

Measures images/s against the instances' aggregate capacity (each instance renders one image in
`seconds_per_step_512 * steps * speed`), and how busy each instance was (its own busy-time counter).

    .venv/bin/python bench/batch_throughput.py [--items 200] [--speed 0.3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from processes import emulator, gateway  # noqa: E402

MODEL = "bench_sd15.safetensors"
PROFILES = ("rtx4090", "rtx4090", "rtx3090", "rtx3090")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--speed", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sd-batch-bench-"))
    procs = []
    try:
        emus = [emulator(tmp, f"e{i}", MODEL, profile=p, speed=args.speed) for i, p in enumerate(PROFILES)]
        procs += emus
        gw = gateway(tmp, emus)
        procs.append(gw)
        per_image = [
            requests.get(f"{e.url}/emulator/stats", timeout=5).json()["profile"]["seconds_per_step_512"]
            * args.steps
            * args.speed
            for e in emus
        ]
        capacity = sum(1 / t for t in per_image)
        items = tmp / "items.jsonl"
        items.write_text("".join(json.dumps({"prompt": f"bench {i}", "seed": i}) + "\n" for i in range(args.items)))
        batch = tmp / "batch.json"
        batch.write_text(
            json.dumps(
                {
                    "apiVersion": "sd-operator.dev/v1alpha1",
                    "kind": "GenerationBatch",
                    "metadata": {"name": "bench", "namespace": "bench", "uid": "bench-uid"},
                    "spec": {
                        "target": {"model": MODEL},
                        "items": {"file": {"claimName": "x", "path": "items.jsonl"}},
                        "defaults": {"width": 512, "height": 512, "steps": args.steps},
                        "output": {"pvc": {"claimName": "out"}, "metadata": True},
                    },
                }
            )
        )
        out = tmp / "out"
        out.mkdir()
        start = time.monotonic()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sd_operator.batch.cli",
                "--batch-file",
                str(batch),
                "--gateway-url",
                gw.url,
                "--items-file",
                str(items),
                "--output-dir",
                str(out),
                "--report",
                "file",
                "--report-file",
                str(tmp / "report.json"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.monotonic() - start
        if result.returncode != 0:
            print(result.stderr[-2000:], file=sys.stderr)
            return 1
        stats = [requests.get(f"{e.url}/emulator/stats", timeout=5).json() for e in emus]
        report = json.loads((tmp / "report.json").read_text())
        # The runner's own clock: from its first request to its last answer (no process start-up).
        run_seconds = float(report["runner"]["seconds"])
        achieved = args.items / run_seconds
        summary = {
            "items": args.items,
            "instances": list(PROFILES),
            "seconds_per_image": [round(t, 3) for t in per_image],
            "capacity_images_per_s": round(capacity, 2),
            "achieved_images_per_s": round(achieved, 2),
            "efficiency": round(achieved / capacity, 3),
            "run_seconds": round(run_seconds, 2),
            "wall_seconds_with_startup": round(seconds, 2),
            "runner_concurrency": report["runner"]["concurrency"],
            "instance_busy_fraction": [round(s["total_busy_seconds"] / run_seconds, 3) for s in stats],
            "generations_per_instance": [s["generations"] for s in stats],
            "max_concurrency_per_instance": [s["max_concurrency"] for s in stats],
        }
        print(json.dumps(summary, indent=2))
        return 0
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
