"""Dispatch quality: how close does each way of spreading work over a mixed fleet get to the ideal makespan?

Setup: four WebUI emulators of ONE model (an SD1.5 checkpoint) on different GPU profiles (rtx3060,
rtx3090, rtx4090, a100-40gb; 9 / 18 / 30 / 25 it/s at 512²). Each emulator, like the WebUI, renders
one generation at a time; a generation takes seconds_per_step_512 * steps * pixels/512² * batch * speed.

Workload: a fixed, seeded shuffle of four job kinds in equal numbers (512²x20, 768²x28, 1024²x30,
512²x20 batch 2; 120 jobs by default), every job with its own seed so the gateway's result cache
never hits. `--clients` closed-loop clients (32) start at once; each takes the next job from the list
when its previous answer arrives, so the whole list is in flight from the first moment.

Strategies, each on freshly started (idle) emulators:
  round-robin  the client posts job i to instance i % 4 directly (requests queue at the instance);
  random       the client posts to a uniformly random instance (seeded);
  nginx        nginx `least_conn` upstream over the four instances (keep-alive to them);
  gateway      `sd-operator gateway` over the four instances (queue in the gateway, idle-only binding).

Measured per strategy: makespan (first submit to last answer), the lower bound
max(total work / aggregate capacity, longest job on the fastest card) computed from the profiles the
emulators report (/emulator/stats), makespan / lower bound, p50/p99 latency (submit to answer),
failed requests, and per card the jobs, busy seconds and when it finished its last job (from the
`info.emulator` timestamps of each answer) - which shows where the tail comes from - and the CPU
that processes other than ours used meanwhile (a loaded machine delays the emulators' timers).

Run:  .venv/bin/python bench/gateway_dispatch.py [--quick] [--jobs 120] [--target-seconds 22]
Prints a markdown table and a JSON summary; exits non-zero only on errors (not on missed goals).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Fleet, ForeignLoad, Proc, background_busy, dump_json, emulator_stats, markdown_table, summary_ms

from sd_operator.emulator.profiles import PROFILES, Family

MODEL = "bench_sd15.safetensors"  # no 'xl' in the name: the sd15 family
CARDS = ["rtx3060", "rtx3090", "rtx4090", "a100-40gb"]
KINDS = {  # name: (width, height, steps, batch)
    "512x20": (512, 512, 20, 1),
    "768x28": (768, 768, 28, 1),
    "1024x30": (1024, 1024, 30, 1),
    "512x20xb2": (512, 512, 20, 2),
}
STRATEGIES = ["round-robin", "random", "nginx", "gateway"]
GOAL_RATIO = 1.05


def units(kind: str) -> float:
    """Work of one job in 512²-image sampling steps (what seconds_per_step_512 is quoted for)."""
    w, h, steps, batch = KINDS[kind]
    return steps * w * h / (512 * 512) * batch


def workload(n: int, seed: int) -> list[str]:
    """n jobs, the four kinds in equal numbers (as near as n allows), in a seeded random order."""
    kinds = list(KINDS)
    jobs = [kinds[i % len(kinds)] for i in range(n)]
    random.Random(seed).shuffle(jobs)  # noqa: S311 - a reproducible workload
    return jobs


def speed_for(jobs: list[str], target_seconds: float) -> float:
    """The emulator speed at which the work lower bound is `target_seconds` of wall time."""
    rate = sum(1 / PROFILES[c].seconds_per_step(Family.SD15) for c in CARDS)  # units/s at speed 1
    return target_seconds / (sum(units(k) for k in jobs) / rate)


def lower_bound(jobs: list[str], seconds_per_unit: dict[str, float]) -> dict[str, float]:
    """max(total work / aggregate capacity, longest job on the fastest card), in seconds."""
    capacity = sum(1 / s for s in seconds_per_unit.values())
    work = sum(units(k) for k in jobs) / capacity
    longest = max(units(k) for k in jobs) * min(seconds_per_unit.values())
    return {"work_bound": work, "longest_job_bound": longest, "lower_bound": max(work, longest)}


@dataclass
class Result:
    index: int
    kind: str
    submitted: float  # perf_counter
    answered: float
    ok: bool
    status: int | str
    card: str | None = None  # from info.emulator.profile
    started: float | None = None  # wall clock (time.time) from the emulator
    finished: float | None = None


async def drive(jobs: list[str], route: Any, clients: int, seed_base: int) -> tuple[list[Result], float, float]:
    """Runs all jobs with `clients` closed-loop clients; returns results and (perf, wall) start times."""
    results: list[Result] = []
    next_job = iter(range(len(jobs)))
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for i in next_job:
                w, h, steps, batch = KINDS[jobs[i]]
                body = {
                    "prompt": f"bench job {i} {jobs[i]}",
                    "steps": steps,
                    "width": w,
                    "height": h,
                    "batch_size": batch,
                    "seed": seed_base + i,
                }
                t = time.perf_counter()
                status: int | str = "?"
                info: dict[str, Any] = {}
                try:
                    async with session.post(f"{route(i)}/sdapi/v1/txt2img", json=body) as r:
                        status = r.status
                        data = await r.json(content_type=None)
                        if status == 200:
                            info = json.loads(data["info"]).get("emulator", {})
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
                    status = type(e).__name__
                done = time.perf_counter()
                results.append(
                    Result(
                        i, jobs[i], t, done, status == 200 and bool(info), status,
                        info.get("profile"), info.get("started"), info.get("finished"),
                    )
                )  # fmt: skip

        t0, wall0 = time.perf_counter(), time.time()
        await asyncio.gather(*(client() for _ in range(clients)))
    return results, t0, wall0


def analyse(
    name: str, jobs: list[str], results: list[Result], t0: float, wall0: float, spu: dict[str, float]
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    makespan = max(r.answered for r in results) - t0
    bound = lower_bound(jobs, spu)
    cards: dict[str, dict[str, Any]] = {}
    for card, seconds_per_unit in spu.items():
        mine = [r for r in ok if r.card == card]
        last = max((r.finished for r in mine if r.finished), default=wall0)
        busy = sum((r.finished or 0) - (r.started or 0) for r in mine)
        sampling = sum(units(r.kind) for r in mine) * seconds_per_unit
        cards[card] = {
            "jobs": len(mine),
            "kinds": {k: sum(1 for r in mine if r.kind == k) for k in KINDS},
            "units": sum(units(r.kind) for r in mine),
            "busy_seconds": round(busy, 3),
            # Where each card's makespan went: simulated sampling (what the bound counts), the emulator's
            # per-job extras (validation, PNG encoding: not in the bound), idle gaps between its jobs
            # (dispatch latency, start-up), and idle time after its last job (the tail).
            "sampling_s": round(sampling, 3),
            "per_job_extra_s": round(busy - sampling, 3),
            "gaps_s": round((last - wall0) - busy, 3),
            "last_finish_s": round(last - wall0, 3),
            "idle_at_end_s": round(makespan - (last - wall0), 3),
        }
    last = max(ok, key=lambda r: r.finished or 0, default=None)
    busy = sum(c["busy_seconds"] for c in cards.values())
    n = len(spu)
    loss = {  # makespan = bound + these (averaged over the cards) + slack of the bound itself
        "tail_idle_s": round(sum(c["idle_at_end_s"] for c in cards.values()) / n, 3),
        "gaps_s": round(sum(c["gaps_s"] for c in cards.values()) / n, 3),
        "per_job_extra_s": round(sum(c["per_job_extra_s"] for c in cards.values()) / n, 3),
    }
    return {
        "strategy": name,
        "jobs": len(results),
        "failed": len(results) - len(ok),
        "failures": sorted({str(r.status) for r in results if not r.ok}),
        "makespan_s": round(makespan, 3),
        **{k: round(v, 3) for k, v in bound.items()},
        "ratio": round(makespan / bound["lower_bound"], 4),
        "latency_ms": {k: round(v, 1) for k, v in summary_ms([r.answered - r.submitted for r in results]).items()},
        "utilisation": round(busy / (len(spu) * makespan), 4),
        "loss_per_card_avg": loss,
        "last_job": {"kind": last.kind, "card": last.card, "index": last.index} if last else None,
        "cards": cards,
    }


def run_strategy(name: str, tmp: Path, jobs: list[str], speed: float, clients: int, seed_base: int) -> dict[str, Any]:
    with Fleet(tmp / name) as fleet:
        (tmp / name).mkdir(parents=True, exist_ok=True)
        emus = fleet.emulators([(c, c, speed) for c in CARDS], MODEL, tag=name)
        stats = {e.name: emulator_stats(e) for e in emus}
        spu = {c: stats[c]["profile"]["seconds_per_step_512"] * stats[c]["speed"] for c in CARDS}
        rng = random.Random(seed_base)  # noqa: S311 - reproducible picks
        picks = [rng.randrange(len(emus)) for _ in jobs]
        front: Proc | None = None
        if name == "nginx":
            front = fleet.nginx_least_conn(emus)
        elif name == "gateway":
            front = fleet.gateway(emus)

        def route(i: int) -> str:
            if name == "round-robin":
                return emus[i % len(emus)].url
            if name == "random":
                return emus[picks[i]].url
            assert front is not None
            return front.url

        with ForeignLoad(fleet) as foreign:
            results, t0, wall0 = asyncio.run(drive(jobs, route, clients, seed_base))
        out = analyse(name, jobs, results, t0, wall0, spu)
        out["foreign_cpu_pct"] = foreign.pct  # CPU used by other users of the machine meanwhile
        after = {e.name: emulator_stats(e) for e in emus}
        out["max_concurrency_per_instance"] = max(s["max_concurrency"] for s in after.values())
        if front is not None and front.name == "gateway":
            card_of = {e.url: e.name for e in emus}
            instances = requests.get(f"{front.url}/v1/instances", timeout=5).json()
            out["gateway_learned_seconds_per_unit"] = {
                card_of.get(b["url"], b["url"]): b["secondsPerUnit"] for b in instances
            }
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 24 jobs, ~3 s lower bound per strategy")
    p.add_argument("--jobs", type=int, help="number of jobs (default 120; quick 24)")
    p.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    p.add_argument("--target-seconds", type=float, help="lower bound to aim the speed at (default 22; quick 3)")
    p.add_argument("--seed", type=int, default=20240601, help="workload shuffle seed")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    p.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    args = p.parse_args()
    n = args.jobs or (24 if args.quick else 120)
    target = args.target_seconds or (3.0 if args.quick else 22.0)
    jobs = workload(n, args.seed)
    speed = speed_for(jobs, target)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies: {', '.join(sorted(unknown))}")
    print(
        f"# dispatch: {n} jobs ({', '.join(f'{k}x{jobs.count(k)}' for k in KINDS)}), {args.clients} clients, "
        f"cards {', '.join(CARDS)}, emulator speed {speed:.4f}",
        flush=True,
    )
    idle_before = background_busy()
    print(f"background load before the run (busy % per core): {idle_before}", flush=True)
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmpdir:
        for k, name in enumerate(strategies):
            started = time.monotonic()
            out = run_strategy(name, Path(tmpdir), jobs, speed, args.clients, 1_000_000 * (k + 1))
            summary.append(out)
            print(
                f"  {name}: makespan {out['makespan_s']:.2f}s, x{out['ratio']:.3f} of the bound, "
                f"{out['failed']} failed ({time.monotonic() - started:.0f}s incl. start/stop)",
                flush=True,
            )
            lat = out["latency_ms"]
            rows.append(
                [
                    name, out["makespan_s"], out["lower_bound"], out["ratio"], lat["p50"] / 1e3, lat["p99"] / 1e3,
                    out["failed"], out["utilisation"], out["loss_per_card_avg"]["tail_idle_s"],
                    out["loss_per_card_avg"]["per_job_extra_s"], out["loss_per_card_avg"]["gaps_s"],
                    out["foreign_cpu_pct"],
                    " ".join(f"{c}:{v['jobs']}/{v['idle_at_end_s']:.1f}" for c, v in out["cards"].items()),
                ]
            )  # fmt: skip
    print()
    print(
        markdown_table(
            [
                "strategy", "makespan s", "lower bound s", "ratio", "p50 s", "p99 s", "failed", "util",
                "avg tail idle s", "avg per-job extra s", "avg gaps s", "other procs CPU %",
                "per card: jobs/idle-at-end s",
            ],
            rows,
        )
    )  # fmt: skip
    ranked = sorted(summary, key=lambda o: o["makespan_s"])
    gw = next((o for o in summary if o["strategy"] == "gateway"), None)
    goals: dict[str, Any] = {}
    if gw is not None:
        goals = {
            f"gateway_within_{GOAL_RATIO}": gw["ratio"] <= GOAL_RATIO,
            "gateway_best": ranked[0]["strategy"] == "gateway",
            "gateway_ratio": gw["ratio"],
        }
        print(
            f"\ngoal: gateway within {GOAL_RATIO} of the bound: "
            f"{'yes' if goals[f'gateway_within_{GOAL_RATIO}'] else 'NO'}"
            f" (x{gw['ratio']:.3f}); best of the strategies: {'yes' if goals['gateway_best'] else 'NO'}"
        )
    doc = {
        "benchmark": "gateway_dispatch",
        "jobs": n,
        "clients": args.clients,
        "speed": speed,
        "cards": CARDS,
        "background_busy_pct_before": idle_before,
        "kinds": {
            k: {"size": f"{w}x{h}", "steps": s, "batch": b, "units": units(k)} for k, (w, h, s, b) in KINDS.items()
        },
        "results": summary,
        "goals": goals,
    }  # fmt: skip
    print("\n```json\n" + dump_json(doc) + "\n```")
    if args.json_out:
        args.json_out.write_text(dump_json(doc))
    failed = sum(o["failed"] for o in summary)
    if failed:
        print(f"ERROR: {failed} failed request(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
