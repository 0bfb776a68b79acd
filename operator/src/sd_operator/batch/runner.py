"""The batch loop: a fixed pool of workers pulls tasks from one lazy iterator, so at most `concurrency`
requests are in flight and memory stays flat whatever the number of items.

Start: check the services layer (model known, preset), pick the concurrency, scan the output for
finished items. Work: each worker sends an item, retries what may pass later, records what never will,
then writes the item's files (marker last). Progress is published at a bounded rate, and through an
outage of the API server the work goes on (report.Publisher); the last counts are retried until they go
through or --final-publish-timeout passes. SIGTERM stops taking items, lets those in flight finish for a
grace period, publishes (for at most SIGNAL_PUBLISH_SECONDS) and exits 143.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from sd_operator.api.generationbatch import GenerationBatchSpec, ImageFormat
from sd_operator.batch.client import (
    Answer,
    FleetUnavailable,
    GatewayClient,
    GatewayUnusable,
    RetriableError,
    backoff,
    classify,
    match_model,
    parse_answer,
)
from sd_operator.batch.items import ItemSource, Task
from sd_operator.batch.output import Store, commit, encode, image_name, sidecar_name
from sd_operator.batch.payload import PermanentItemError, build_body
from sd_operator.batch.report import Counters, Publisher, RateLimit, Reporter, format_duration, progress_line, status
from sd_operator.gateway.presets import Preset

log = logging.getLogger("sd_operator.batch")
EXIT_OK, EXIT_CRASH, EXIT_SOME_FAILED = 0, 1, 3
# Stopped by SIGTERM, the last counts are tried for at most this long: the pod's grace period is 30 s, of
# which the items in flight may take 10 (Settings.grace_seconds).
SIGNAL_PUBLISH_SECONDS = 15.0


class BatchError(Exception):
    """Unusable input or a crash: exit 1 with this one line."""


class _Abandoned(Exception):
    """Stopping while an item waited to retry: not a failure, the next run renders it."""


@dataclass
class Settings:
    name: str  # namespace/name, for logs
    batch: str
    namespace: str
    spec: GenerationBatchSpec
    gateway_url: str
    model: str
    api_key: str | None = None
    concurrency: int | None = None  # --concurrency
    inputs_dir: Path | None = None
    grace_seconds: float = 10.0
    tick_seconds: float = 0.25
    start_attempts: int = 3
    model_wait_seconds: float = 300.0  # --model-wait
    final_publish_seconds: float = 300.0  # --final-publish-timeout


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runner:
    def __init__(self, s: Settings, source: ItemSource, store: Store, reporter: Reporter) -> None:
        self.s, self.source, self.store, self.reporter = s, source, store, reporter
        self.c = Counters(total=source.total)
        self.fmt = ImageFormat(s.spec.output.format)
        self.marker_ext = "json" if s.spec.output.metadata else self.fmt.value
        self.preset: Preset | None = None
        self.concurrency = 1
        self.stopping = asyncio.Event()
        self.signal: int | None = None
        self.fatal: str | None = None
        self.started = time.monotonic()
        self.publisher = Publisher(reporter, s.name)

    # -- start ----------------------------------------------------------------------------------------------

    async def _models(self, client: GatewayClient) -> list[dict[str, Any]]:
        for attempt in range(self.s.start_attempts):
            try:
                models = await client.get_json("/v1/models")
                return models if isinstance(models, list) else []
            except GatewayUnusable as e:
                if attempt + 1 == self.s.start_attempts or "refused" in str(e):
                    raise
                await asyncio.sleep(backoff(attempt + 1))
        return []

    async def _check_gateway(self, client: GatewayClient) -> None:
        # A batch applied together with its SDInstance (one `kubectl apply`, one Argo CD sync) starts
        # before the instance is Ready: wait for the model a while instead of failing the pod.
        deadline = time.monotonic() + self.s.model_wait_seconds
        while True:
            models = await self._models(client)
            matched = match_model(models, self.s.model)
            if matched:
                break
            served = ", ".join(str(m.get("filename")) for m in models) or "none"
            if time.monotonic() >= deadline or self.stopping.is_set():
                raise GatewayUnusable(f"unknown target model {self.s.model!r}; the services layer serves: {served}")
            log.info(
                "batch %s: waiting for model %s (the services layer serves: %s)", self.s.name, self.s.model, served
            )
            await asyncio.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        instances = sum(int(m.get("instances") or 0) for m in matched)
        # Default: one request rendering plus one waiting in the gateway per ready instance. With only one
        # per instance, every instance idles while the runner stores an answer and sends the next request
        # (measured: 86% of capacity); the gateway still hands each instance one request at a time.
        self.concurrency = self.s.concurrency or self.s.spec.concurrency or max(1, 2 * instances)
        if self.s.spec.preset:
            presets = (await client.get_json("/v1/presets")).get("presets") or {}
            if self.s.spec.preset not in presets:
                raise GatewayUnusable(f"unknown preset {self.s.spec.preset!r}; available: {', '.join(sorted(presets))}")
            self.preset = Preset.model_validate(presets[self.s.spec.preset])

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
            client = GatewayClient(
                session, self.s.gateway_url, self.s.model, self.s.spec.priority, self.s.spec.item_timeout_seconds
            )
            try:
                await self._check_gateway(client)
            except GatewayUnusable as e:
                raise BatchError(str(e)) from None
            done = bytearray(self.c.total)

            def mark(index: int) -> None:
                if 0 <= index < len(done):
                    done[index] = 1

            try:
                await asyncio.to_thread(self.store.scan, self.marker_ext, mark)
            except Exception as e:
                raise BatchError(f"cannot list the output at {self.store.location}: {e}") from e
            self.c.succeeded = self.c.already_done = sum(done)
            log.info(
                "batch %s: %d items (%d done before), model %s, concurrency %d, output %s",
                self.s.name, self.c.total, self.c.already_done, self.s.model, self.concurrency, self.store.location,
            )  # fmt: skip
            self.started = time.monotonic()
            await self.publish()
            await self._work(client, self.source.tasks(lambda i: done[i] == 1))
            await self.publish_final()
        return self._exit_code()

    def _on_signal(self, sig: int) -> None:
        if self.signal is None:
            log.info("batch %s: %s: no new items; waiting for those in flight", self.s.name, signal.Signals(sig).name)
        self.signal = sig
        self.stopping.set()

    def _exit_code(self) -> int:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        log.info(
            "batch %s finished: succeeded=%d, failed=%d, images=%d, seconds=%.1f, images/s=%.2f",
            self.s.name, self.c.succeeded, self.c.failed, self.c.images, elapsed, self.c.images / elapsed,
        )  # fmt: skip
        if self.fatal:
            raise BatchError(self.fatal)
        if self.signal is not None and self.c.finished < self.c.total:
            return 128 + self.signal
        return EXIT_SOME_FAILED if self.c.failed else EXIT_OK

    # -- work -----------------------------------------------------------------------------------------------

    async def _work(self, client: GatewayClient, tasks: Iterator[Task]) -> None:
        workers = [asyncio.create_task(self._worker(client, tasks)) for _ in range(self.concurrency)]
        progress = asyncio.create_task(self._progress())
        all_done: asyncio.Future[Any] = asyncio.gather(*workers)
        stop: asyncio.Future[Any] = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([all_done, stop], return_when=asyncio.FIRST_COMPLETED)
        if not all_done.done():
            _, late = await asyncio.wait(workers, timeout=self.s.grace_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        stop.cancel()
        self.stopping.set()  # also ends the progress loop
        await progress

    async def _worker(self, client: GatewayClient, tasks: Iterator[Task]) -> None:
        while not self.stopping.is_set():
            try:
                task = next(tasks, None)  # no await in between: workers never run the iterator at once
                if task is None:
                    return
            except Exception as e:
                self._crash(f"cannot read the items: {e}")
                return
            self.c.running += 1
            self.c.max_in_flight = max(self.c.max_in_flight, self.c.running)
            try:
                await self._item(client, task)
            except PermanentItemError as e:
                log.warning("batch %s: item %d failed: %s", self.s.name, task.index, e)
                self.c.fail(task.index, str(e))
            except _Abandoned:
                pass
            except Exception as e:
                log.exception("batch %s: item %d", self.s.name, task.index)
                self._crash(f"item {task.index}: {e.__class__.__name__}: {e}")
            finally:
                self.c.running -= 1

    def _crash(self, message: str) -> None:
        self.fatal = self.fatal or message
        self.stopping.set()

    async def _item(self, client: GatewayClient, task: Task) -> None:
        queued = time.time()
        if task.error or task.params is None:
            raise PermanentItemError(task.error or "no parameters")
        body, recorded = build_body(
            task.params, prompt_prefix=self.s.spec.prompt_prefix, preset=self.preset, inputs_dir=self.s.inputs_dir
        )
        expected = int(body.get("batch_size") or 1) * int(body.get("n_iter") or 1)
        attempt, waited_since = 0, time.monotonic()
        while True:
            started = time.time()
            try:
                code, data, retry_after, backend = await client.txt2img(body)
                if code != 200:
                    raise classify(code, data, retry_after)
                answer = await asyncio.to_thread(parse_answer, data, expected, backend)
                break
            except FleetUnavailable as e:
                if time.monotonic() - waited_since > self.s.spec.item_timeout_seconds:
                    raise PermanentItemError(f"{e} (no instance for {self.s.spec.item_timeout_seconds}s)") from None
                if await self._stopped_within(min(30.0, backoff(3, e.retry_after))):
                    raise _Abandoned from None
                continue
            except RetriableError as e:
                if attempt == self.s.spec.retries:
                    raise PermanentItemError(f"{e} (gave up after {attempt + 1} attempts)") from None
                delay = backoff(attempt, e.retry_after)
                log.info("batch %s: item %d: %s; retrying in %.1fs", self.s.name, task.index, e, delay)
                if await self._stopped_within(delay):
                    raise _Abandoned from None
                attempt += 1
        finished = time.time()
        timings: dict[str, Any] = {"queued_at": _iso(queued), "started": _iso(started), "finished": _iso(finished)}
        timings |= {"seconds": round(finished - started, 3), "attempts": attempt + 1}
        await asyncio.to_thread(self._write, task, answer, recorded, timings)
        self.c.succeeded += 1
        self.c.images += len(answer.images)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _write(self, task: Task, answer: Answer, recorded: dict[str, Any], timings: dict[str, Any]) -> None:
        """Encodes and writes an item's files (in a worker thread: Pillow and file I/O block)."""
        ext = self.fmt.value
        files = [
            (image_name(task.index, task.seed, k, ext), encode(png, self.fmt)) for k, png in enumerate(answer.images)
        ]
        if not self.s.spec.output.metadata:
            commit(self.store, files, None)
            return
        info = answer.info
        emulated = info.get("emulator") or {}
        if "started" in emulated:  # the backend's own render times, when it reports them (the emulator does)
            timings["backend"] = {"started": emulated["started"], "finished": emulated.get("finished")}
        texts = info.get("infotexts") or []
        sidecar = {
            "batch": self.s.batch,
            "namespace": self.s.namespace,
            "index": task.index,
            **({"line": task.line} if task.line is not None else {}),
            "prompt": recorded.get("prompt"),
            "negative_prompt": recorded.get("negative_prompt"),
            "seed": task.seed,
            "seeds": (info.get("all_seeds") or [task.seed])[: len(files)],
            "images": [name for name, _ in files],
            "model": info.get("sd_model_name") or self.s.model,
            "model_hash": info.get("sd_model_hash"),
            "backend": answer.backend,
            "infotext": texts[0] if texts else None,
            **({"infotexts": texts[: len(files)]} if len(files) > 1 else {}),
            "parameters": recorded,
            "timings": timings,
        }
        data = json.dumps(sidecar, indent=2, ensure_ascii=False).encode()
        commit(self.store, files, (sidecar_name(task.index, task.seed), data))

    # -- progress -------------------------------------------------------------------------------------------

    async def _progress(self) -> None:
        rate = RateLimit(self.c.total)
        rate.mark(self.c.finished)  # the start was just published
        while not await self._stopped_within(self.s.tick_seconds):
            if rate.due(self.c.finished):
                rate.mark(self.c.finished)
                log.info(progress_line(self.s.name, self.c, time.monotonic() - self.started))
                await self.publish()

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The status and the runner's own figures as of now (taken when a publish is sent)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        runner = {
            "concurrency": self.concurrency,
            "maxInFlight": self.c.max_in_flight,
            "alreadyDone": self.c.already_done,
            "images": self.c.images,
            "seconds": round(elapsed, 3),
            "imagesPerSecond": round(self.c.images / elapsed, 3),
        }
        return status(self.c, self.store.location), runner

    async def publish(self) -> None:
        """Sends the status unless a failed publish is waiting out its backoff (the next one carries
        the counts); one at a time, so a slow patch can never land after a newer one."""
        await self.publisher.publish(self._snapshot)

    async def publish_final(self) -> None:
        """The run's last counts, retried through an outage; if they never go through the exit code is
        still the work's (every finished item is in the output, and the next run's scan counts it)."""
        timeout = self.s.final_publish_seconds
        if self.signal is not None:
            timeout = min(timeout, SIGNAL_PUBLISH_SECONDS)
        if not await self.publisher.publish_final(self._snapshot, timeout):
            log.warning(
                "batch %s: gave up publishing the final progress after %s; the status keeps the last counts "
                "published, the output has all %d finished items",
                self.s.name, format_duration(timeout), self.c.succeeded,
            )  # fmt: skip
