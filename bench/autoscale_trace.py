"""Demand-driven autoscaling on a compressed day: a discrete-event simulation driven by the real scaling rule.

No cluster and no wall clock: a seeded trace of arrivals is played against three fleets of one GPU class,
and every scaling decision of the autoscaled fleet comes from `sd_operator.autoscaling.decide()`, the code
the operator runs. The run takes seconds.

Trace: Poisson arrivals with a piecewise-constant rate (`--trace name:seconds:per-minute,...`; by default
4 hours: an hour of near silence, a sharp 15-minute burst, a two-hour plateau, quiet again). Requests are
txt2img on one checkpoint (`--kinds WxHxSTEPS[:weight],...`, SDXL 1024x1024 30 steps by default); a
request renders for `steps * seconds_per_step * pixels / 512²` on `--gpu` (the emulator's GPU profiles).

Gateway: one FIFO queue for the model; a request is bound to an idle ready pod (one render at a time per
pod: the WebUI holds one lock). A request fails when it has waited `--timeout` seconds without starting
(the gateway's --cold-start-timeout) or when `--max-queue` requests are already waiting (429).

Autoscaled fleet: every `--interval` seconds (the operator's timer) the demand Demand(queued, running) is
read from the simulated gateway and `decide()` gives the replica count, with Policy(min, max, target,
scaleDownDelay). A new pod holds its GPU from creation and serves after `--cold-start` seconds (image
cached, model from the PVC cache, loaded to the GPU). On scale-down the pods go as a ReplicaSet picks
them (not yet ready first, then the most recently ready; it does not know which pods are busy); a removed
pod takes no new work but finishes the request it renders (the preStop drain) and holds its GPU until then.
The run is repeated with `--compare-cold-start` (ephemeral storage: the model downloaded on every start).

Static fleets, warm from the start: sized for the peak (the autoscaler's max: ceil(peak rate x mean
service / --utilisation)) and sized for the mean (ceil(mean rate x mean service / --utilisation)).

Reported per fleet: GPU-pod-seconds (what the GPUs cost: from a pod's creation to its removal), the ratio
to the static-peak fleet, completed and failed requests, p50/p95/p99 wait (arrival to start of render)
and p99 total latency (arrival to end of render), scale events and cold starts. A failed request counts
as an infinite wait and latency (a percentile is then "inf": more than 100-q % of the requests failed).
The static fleets are charged from 0 to the end of the trace (or to the last request's end, if later); the
autoscaled one also for its tail after the trace, until it is back at minReplicas (the delay after the
last request).
Then the issue's goals as PASS/FAIL lines. The simulation evaluates only on the timer (the operator also
re-evaluates at once when a gateway's report changes, so real scale-ups come up to 2 s sooner).

Run:  .venv/bin/python bench/autoscale_trace.py [--cold-start 60] [--max 14] [--json out.json]
Exits non-zero only on errors (not on missed goals).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, markdown_table

from sd_operator.autoscaling import Demand, Policy, ScaleState, decide
from sd_operator.emulator.profiles import PROFILES, UNIT_PIXELS, Family

DEFAULT_TRACE = "quiet:3600:0.1,burst:900:120,plateau:7200:40,quiet:2700:0.1"
DEFAULT_KINDS = "1024x1024x30"
EVALUATE_SECONDS = 2.0  # sd_operator.controllers.autoscaler.EVALUATE_SECONDS (not imported: it pulls in kopf)
QUANTILES = (50, 95, 99)

# Events at the same instant: a finishing render frees its pod before a pod becomes ready, a queued
# request times out, a new one arrives, and the autoscaler looks last (so it sees that instant's state).
FINISH, READY, TIMEOUT, ARRIVAL, TICK = range(5)


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    per_minute: float  # mean arrivals per minute


@dataclass(frozen=True)
class Kind:
    width: int
    height: int
    steps: int
    weight: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.steps}"


@dataclass
class Request:
    id: int
    arrival: float
    service: float  # render seconds
    phase: int = 0
    start: float | None = None
    end: float | None = None
    failed: str | None = None  # "timeout" or "queue-full"
    resolved: float | None = None  # when it completed or failed
    pod: int | None = None  # the pod that rendered it

    @property
    def wait(self) -> float:
        return math.inf if self.start is None else self.start - self.arrival

    @property
    def latency(self) -> float:
        return math.inf if self.end is None else self.end - self.arrival


@dataclass
class Pod:
    id: int
    created: float
    ready_at: float
    ready: bool = False
    draining: bool = False
    request: Request | None = None
    removed: float | None = None


@dataclass
class ScaleEvent:
    time: float
    previous: int
    replicas: int
    reason: str
    queued: int
    running: int


@dataclass
class Run:
    """One fleet on one trace: its requests (resolved), pods (with their lifetimes) and scale events."""

    name: str
    requests: list[Request]
    pods: list[Pod]
    end: float  # the fleets are charged over [0, end]
    events: list[ScaleEvent] = field(default_factory=list)
    max_live: int = 0  # most pods at once that were not draining (what the Deployment asked for)
    max_pods: int = 0  # most pods at once, draining ones included
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (time, live pods, ready pods)

    def gpu_seconds(self, start: float = 0.0, stop: float | None = None) -> float:
        stop = self.end if stop is None else min(stop, self.end)
        total = 0.0
        for pod in self.pods:
            gone = self.end if pod.removed is None else min(pod.removed, self.end)
            total += max(0.0, min(gone, stop) - max(pod.created, start))
        return total


# --- the trace ---------------------------------------------------------------------------------------------


def parse_trace(text: str) -> list[Phase]:
    phases = []
    for part in text.split(","):
        name, seconds, rate = part.strip().split(":")
        phases.append(Phase(name, float(seconds), float(rate)))
    if not phases or any(p.seconds <= 0 or p.per_minute < 0 for p in phases):
        raise ValueError(f"bad trace {text!r}: name:seconds:per-minute, seconds > 0, rate >= 0")
    return phases


def parse_kinds(text: str) -> list[Kind]:
    kinds = []
    for part in text.split(","):
        size, _, weight = part.strip().partition(":")
        w, h, steps = (int(x) for x in size.split("x"))
        kinds.append(Kind(w, h, steps, float(weight or 1)))
    return kinds


def service_seconds(kind: Kind, gpu: str, family: Family) -> float:
    """What the emulator takes for one image of `kind` (engine.step_seconds, batch 1, speed 1)."""
    return PROFILES[gpu].seconds_per_step(family) * kind.width * kind.height / UNIT_PIXELS * kind.steps


def make_arrivals(phases: list[Phase], services: list[tuple[float, float]], seed: int) -> list[Request]:
    """Poisson arrivals, phase by phase (memoryless: restarting the clock at a boundary is exact); each
    request's render time drawn from `services` [(seconds, weight)]."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible trace
    seconds, weights = [s for s, _ in services], [w for _, w in services]
    out: list[Request] = []
    begin = 0.0
    for index, phase in enumerate(phases):
        t, stop, rate = begin, begin + phase.seconds, phase.per_minute / 60
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= stop:
                break
            out.append(Request(len(out), t, rng.choices(seconds, weights)[0], index))
        begin = stop
    return out


def phase_bounds(phases: list[Phase]) -> list[tuple[float, float]]:
    bounds, t = [], 0.0
    for p in phases:
        bounds.append((t, t + p.seconds))
        t += p.seconds
    return bounds


def replicas_for(rate_per_s: float, mean_service: float, utilisation: float) -> int:
    return max(1, math.ceil(rate_per_s * mean_service / utilisation - 1e-9))


# --- the simulation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    cold_start: float = 60.0
    timeout: float = 600.0
    max_queue: int = 1000
    interval: float = EVALUATE_SECONDS


def simulate(
    arrivals: list[Request],
    duration: float,
    settings: Settings,
    static: int | None = None,
    policy: Policy | None = None,
    name: str = "",
) -> Run:
    """Plays `arrivals` (copied: the list is reused) against a static fleet of `static` warm pods, or one
    scaled by `decide()` under `policy`. Arrivals stop at `duration`; the run goes on until every request
    is resolved, and the autoscaler's timer until the fleet is back at minReplicas after `duration`. The run
    is charged from 0 to the last of these (`Run.end`)."""
    if (static is None) == (policy is None):
        raise ValueError("give either static or policy")
    requests = [Request(r.id, r.arrival, r.service, r.phase) for r in arrivals]
    pods: list[Pod] = []
    queue: deque[Request] = deque()
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    run = Run(name or (f"static-{static}" if static is not None else "autoscaled"), requests, pods, duration)

    def push(t: float, kind: int, item: Any) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, kind, seq, item))
        seq += 1

    def new_pod(now: float, cold: float) -> None:
        pod = Pod(len(pods), now, now + cold)
        pods.append(pod)
        push(pod.ready_at, READY, pod)

    def live() -> list[Pod]:
        return [p for p in pods if p.removed is None and not p.draining]

    def count() -> None:
        run.max_live = max(run.max_live, len(live()))
        run.max_pods = max(run.max_pods, sum(1 for p in pods if p.removed is None))

    def dispatch(now: float) -> None:
        idle = [p for p in pods if p.ready and p.removed is None and not p.draining and p.request is None]
        for pod in idle:  # the longest-standing pod first
            if not queue:
                return
            req = queue.popleft()
            req.start, req.pod, pod.request = now, pod.id, req
            push(now + req.service, FINISH, pod)

    def scale_to(now: float, replicas: int) -> None:
        current = live()
        if replicas > len(current):
            for _ in range(replicas - len(current)):
                new_pod(now, settings.cold_start)
        elif replicas < len(current):
            # A ReplicaSet's pick: not ready before ready, then the most recently ready (newest on a tie).
            ranked = sorted(current, key=lambda p: (p.ready, -p.ready_at, -p.created))
            for pod in ranked[: len(current) - replicas]:
                if pod.request is None:
                    pod.removed = now
                else:
                    pod.draining = True  # finishes its render, then goes
        count()

    for _ in range(static or 0):
        pods.append(Pod(len(pods), 0.0, 0.0, ready=True))
    count()
    state = ScaleState.starting(policy.min_replicas, 0.0) if policy else None
    if policy is not None:
        scale_to(0.0, policy.min_replicas)
        push(0.0, TICK, None)
    for req in requests:
        push(req.arrival, ARRIVAL, req)
    unresolved = len(requests)

    while heap:
        now, kind, _, item = heapq.heappop(heap)
        if kind == FINISH:
            pod, req = item, item.request
            req.end = req.resolved = now
            pod.request = None
            unresolved -= 1
            if pod.draining:
                pod.removed = now
        elif kind == READY:
            if item.removed is not None:
                continue  # scaled away while starting
            item.ready = True
        elif kind == TIMEOUT:
            if item.start is None and item.failed is None:
                # FIFO with one timeout for all: the request that times out is the oldest one waiting.
                assert queue[0] is item
                queue.popleft()
                item.failed, item.resolved = "timeout", now
                unresolved -= 1
        elif kind == ARRIVAL:
            if len(queue) >= settings.max_queue:
                item.failed, item.resolved = "queue-full", now
                unresolved -= 1
            else:
                queue.append(item)
                push(now + settings.timeout, TIMEOUT, item)
        elif kind == TICK:
            assert policy is not None and state is not None
            demand = Demand(queued=len(queue), running=sum(1 for p in pods if p.request is not None))
            previous = state.desired
            decision = decide(state, demand, policy, now)
            if decision.changed:
                run.events.append(
                    ScaleEvent(now, previous, decision.replicas, decision.reason, demand.queued, demand.running)
                )
            scale_to(now, decision.replicas)
            current = live()
            run.timeline.append((now, len(current), sum(1 for p in current if p.ready)))
            # After the trace, until the fleet is back at minReplicas: its scale-down tail is its cost too.
            settled = len(current) <= policy.min_replicas and not any(p.draining and p.removed is None for p in pods)
            if now + settings.interval <= duration or unresolved > 0 or not settled:
                push(now + settings.interval, TICK, None)
        dispatch(now)
    assert unresolved == 0
    resolved = [r.resolved for r in requests if r.resolved is not None]
    run.end = max([duration, *resolved, *(p.removed for p in pods if p.removed is not None)])
    return run


# --- the report --------------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (exact with infinite values: a failed request counts as waiting forever)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(run: Run, reference_gpu_seconds: float | None = None) -> dict[str, Any]:
    reqs = run.requests
    waits, latencies = [r.wait for r in reqs], [r.latency for r in reqs]
    gpu = run.gpu_seconds()
    busy = sum(r.service for r in reqs if r.end is not None)
    return {
        "fleet": run.name,
        "charged_seconds": round(run.end, 1),
        "gpu_pod_seconds": round(gpu, 1),
        "ratio_to_static_peak": round(gpu / reference_gpu_seconds, 4) if reference_gpu_seconds else None,
        "mean_pods": round(gpu / run.end, 3),
        "utilisation": round(busy / gpu, 4) if gpu else 0.0,
        "arrivals": len(reqs),
        "completed": sum(1 for r in reqs if r.end is not None),
        "failed": sum(1 for r in reqs if r.failed),
        "failed_timeout": sum(1 for r in reqs if r.failed == "timeout"),
        "failed_queue_full": sum(1 for r in reqs if r.failed == "queue-full"),
        "wait_s": {f"p{q}": quantile(waits, q) for q in QUANTILES},
        "wait_max_s": max((w for w in waits if math.isfinite(w)), default=0.0),
        "latency_p99_s": quantile(latencies, 99),
        "scale_events": len(run.events),
        "cold_starts": sum(1 for p in run.pods if p.created > 0 or p.ready_at > 0),
        "max_pods": run.max_pods,
    }


def per_phase(run: Run, phases: list[Phase]) -> list[dict[str, Any]]:
    rows = []
    for index, (phase, (a, b)) in enumerate(zip(phases, phase_bounds(phases), strict=True)):
        mine = [r for r in run.requests if r.phase == index]
        gpu = run.gpu_seconds(a, b)
        rows.append(
            {
                "phase": f"{index + 1} {phase.name}",
                "seconds": phase.seconds,
                "per_minute": phase.per_minute,
                "arrivals": len(mine),
                "failed": sum(1 for r in mine if r.failed),
                "wait_p50_s": quantile([r.wait for r in mine], 50),
                "wait_p99_s": quantile([r.wait for r in mine], 99),
                "mean_pods": round(gpu / phase.seconds, 2),
                "gpu_pod_seconds": round(gpu, 1),
            }
        )
    return rows


def seconds(v: float) -> str:
    if math.isnan(v):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def finite(obj: Any) -> Any:
    """JSON has no infinity: an infinite percentile (more than 100-q % failed) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def goals(auto: dict[str, Any], peak: dict[str, Any], cold_start: float, generation: float) -> list[tuple[bool, str]]:
    limit = cold_start + generation
    p99 = auto["wait_s"]["p99"]
    return [
        (
            auto["gpu_pod_seconds"] <= 0.5 * peak["gpu_pod_seconds"],
            f"autoscaled GPU-pod-seconds {auto['gpu_pod_seconds']:.0f} <= half of static-peak's "
            f"{peak['gpu_pod_seconds']:.0f} (ratio {auto['ratio_to_static_peak']:.3f})",
        ),
        (auto["failed"] == 0, f"zero failed requests ({auto['failed']} of {auto['arrivals']} failed)"),
        (
            p99 <= limit,
            f"autoscaled p99 wait {seconds(p99)} s <= cold start + one generation "
            f"({cold_start:g} + {generation:.1f} = {limit:.1f} s)",
        ),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=DEFAULT_TRACE, help="phases name:seconds:arrivals-per-minute, comma-separated")
    p.add_argument("--kinds", default=DEFAULT_KINDS, help="request mix WxHxSTEPS[:weight], comma-separated")
    p.add_argument("--gpu", default="rtx4090", choices=sorted(PROFILES), help="GPU profile of every pod")
    p.add_argument("--family", default="sdxl", choices=[f.value for f in Family], help="the checkpoint's family")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--min", type=int, default=0, help="minReplicas")
    p.add_argument("--max", type=int, help="maxReplicas (default: the peak-sized static fleet)")
    p.add_argument("--target", type=int, default=2, help="targetPerReplica (queued + running per pod)")
    p.add_argument("--scale-down-delay", type=float, default=600.0, help="scaleDownDelaySeconds")
    p.add_argument("--cold-start", type=float, default=60.0, help="seconds from a pod's creation to ready")
    p.add_argument("--compare-cold-start", type=float, default=180.0, help="a second cold start to show (0: none)")
    p.add_argument("--timeout", type=float, default=600.0, help="the gateway's --cold-start-timeout")
    p.add_argument("--max-queue", type=int, default=1000, help="the gateway's queue limit per model")
    p.add_argument("--interval", type=float, default=EVALUATE_SECONDS, help="seconds between evaluations")
    p.add_argument("--utilisation", type=float, default=0.8, help="target utilisation of the static fleets' sizing")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    phases = parse_trace(args.trace)
    kinds = parse_kinds(args.kinds)
    family = Family(args.family)
    services = [(service_seconds(k, args.gpu, family), k.weight) for k in kinds]
    mean_service = sum(s * w for s, w in services) / sum(w for _, w in services)
    duration = sum(ph.seconds for ph in phases)
    arrivals = make_arrivals(phases, services, args.seed)
    mean_rate = sum(ph.seconds * ph.per_minute / 60 for ph in phases) / duration
    peak_rate = max(ph.per_minute / 60 for ph in phases)
    peak_size = replicas_for(peak_rate, mean_service, args.utilisation)
    mean_size = replicas_for(mean_rate, mean_service, args.utilisation)
    policy = Policy(args.min, args.max or peak_size, args.target, args.scale_down_delay)
    settings = Settings(args.cold_start, args.timeout, args.max_queue, args.interval)

    print(
        f"# autoscale trace: {duration / 3600:g} h simulated, {len(arrivals)} requests "
        f"({', '.join(f'{k.label}:{k.weight:g}' for k in kinds)}; {family.value} on {args.gpu}, "
        f"mean render {mean_service:.2f} s), seed {args.seed}"
    )
    print(
        f"policy: min {policy.min_replicas}, max {policy.max_replicas}, target {policy.target_per_replica} per "
        f"replica, scaleDownDelay {policy.scale_down_delay:g} s, evaluated every {settings.interval:g} s; "
        f"timeout {settings.timeout:g} s, queue limit {settings.max_queue}"
    )
    print(
        f"static fleets at {args.utilisation:g} utilisation: peak {peak_rate * 60:g}/min -> {peak_size} pods "
        f"(static-peak: the autoscaler's max, {policy.max_replicas}); mean {mean_rate * 60:.2f}/min -> "
        f"{mean_size} pods (static-mean)"
    )
    print()
    print(
        markdown_table(
            ["phase", "from s", "seconds", "per minute", "arrivals"],
            [
                [
                    f"{i + 1} {ph.name}",
                    f"{a:g}",
                    f"{ph.seconds:g}",
                    f"{ph.per_minute:g}",
                    sum(1 for r in arrivals if r.phase == i),
                ]
                for i, (ph, (a, _)) in enumerate(zip(phases, phase_bounds(phases), strict=True))
            ],
        )
    )

    colds = [args.cold_start] + ([args.compare_cold_start] if args.compare_cold_start > 0 else [])
    autos = [
        simulate(
            arrivals, duration, Settings(c, args.timeout, args.max_queue, args.interval), policy=policy,
            name=f"autoscaled (cold start {c:g} s)",
        )
        for c in colds
    ]  # fmt: skip
    peak = simulate(
        arrivals, duration, settings, static=policy.max_replicas, name=f"static-peak ({policy.max_replicas})"
    )
    mean = simulate(arrivals, duration, settings, static=mean_size, name=f"static-mean ({mean_size})")
    reference = peak.gpu_seconds()
    summaries = [summarize(r, reference) for r in [*autos, peak, mean]]
    peak_summary = summaries[len(autos)]

    print()
    print(
        markdown_table(
            [
                "fleet", "GPU-pod-s", "vs static-peak", "mean pods", "util", "completed", "failed",
                "p50 wait s", "p95 wait s", "p99 wait s", "p99 total s", "scale events", "cold starts",
            ],
            [
                [
                    s["fleet"], f"{s['gpu_pod_seconds']:.0f}", f"{s['ratio_to_static_peak']:.3f}", s["mean_pods"],
                    s["utilisation"], s["completed"], s["failed"], *(seconds(s["wait_s"][f"p{q}"]) for q in QUANTILES),
                    seconds(s["latency_p99_s"]), s["scale_events"], s["cold_starts"],
                ]
                for s in summaries
            ],
        )
    )  # fmt: skip
    phase_rows = {r.name: per_phase(r, phases) for r in autos}
    for name, rows in phase_rows.items():
        print(f"\n{name}, per phase:")
        print(
            markdown_table(
                ["phase", "arrivals", "failed", "p50 wait s", "p99 wait s", "mean pods", "GPU-pod-s"],
                [
                    [
                        r["phase"], r["arrivals"], r["failed"], seconds(r["wait_p50_s"]), seconds(r["wait_p99_s"]),
                        r["mean_pods"], f"{r['gpu_pod_seconds']:.0f}",
                    ]
                    for r in rows
                ],
            )
        )  # fmt: skip

    checks: dict[str, list[dict[str, Any]]] = {}
    for cold, auto in zip(colds, summaries, strict=False):
        results = goals(auto, peak_summary, cold, mean_service)
        label = "goals" if cold == colds[0] else "for comparison"
        print(f"\n{label} (cold start {cold:g} s):")
        for ok, text in results:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        checks[f"cold_start_{cold:g}"] = [{"pass": ok, "check": text} for ok, text in results]

    if args.json:
        doc = {
            "benchmark": "autoscale_trace",
            "seed": args.seed,
            "duration_s": duration,
            "gpu": args.gpu,
            "family": family.value,
            "kinds": {k.label: {"weight": k.weight, "render_s": s} for k, (s, _) in zip(kinds, services, strict=True)},
            "mean_render_s": mean_service,
            "trace": [{"name": ph.name, "seconds": ph.seconds, "per_minute": ph.per_minute} for ph in phases],
            "arrivals": len(arrivals),
            "policy": {
                "minReplicas": policy.min_replicas,
                "maxReplicas": policy.max_replicas,
                "targetPerReplica": policy.target_per_replica,
                "scaleDownDelaySeconds": policy.scale_down_delay,
            },
            "settings": {
                "timeout_s": settings.timeout,
                "max_queue": settings.max_queue,
                "interval_s": settings.interval,
            },
            "utilisation": args.utilisation,
            "results": summaries,
            "per_phase": phase_rows,
            "scale_events": {
                r.name: [[round(e.time, 3), e.previous, e.replicas, e.reason, e.queued, e.running] for e in r.events]
                for r in autos
            },
            "goals": checks,
        }
        args.json.write_text(dump_json(finite(doc)) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
