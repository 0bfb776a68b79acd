"""Batch outputs for the console: what a runner wrote (batch/output.py), read back, paged, as thumbnails.

The runner names every item's files `{index:06d}-{seed}...` and writes its commit marker last (the JSON
sidecar, or the first image without metadata), so the finished items are exactly the markers, and their
index order is the batch's. Two stores, as the runner's:

- a PersistentVolumeClaim: readable only when the claim is mounted into the gateway pod
  (`--outputs-dir [NAMESPACE/]CLAIM=PATH`; a pod mounts claims of its own namespace, so with several
  namespaces the volume must be ReadWriteMany and mounted by each side). Not mounted: 404 with advice.
- S3: the batch's bucket and prefix, with the credentials of its `credentialsSecret` (read from the API
  like the runner's pod gets them), else the gateway pod's own identity.

Listings are cached briefly (a running batch grows), sidecars and thumbnails are cached with a bound
(files never change once their marker is written: every write is an atomic rename or single put).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sd_operator.batch.output import CONTENT_TYPES, NAME, TEMP, S3Store, image_name

log = logging.getLogger("sd_operator.gateway.console")
THUMBNAIL_PIXELS = 256  # the longer side
LISTING_SECONDS = 3.0  # a running batch's listing is re-read after this
FINISHED = {"Succeeded", "Failed"}


class OutputsUnavailable(Exception):
    """The outputs cannot be read here: `status` and advice for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Entry:
    """One finished item: its index, its seed and the name of its marker file."""

    index: int
    seed: int
    marker: str


# ---------------------------------------------------------------------------------------------
# Pure parts: markers, paging, items, the evaluation grid


def marker_ext(spec: dict[str, Any]) -> str:
    output = spec.get("output") or {}
    return "json" if output.get("metadata", True) else str(output.get("format") or "png")


def finished_items(names: Iterable[str], marker: str) -> list[Entry]:
    """The finished items among a store's file names, in index order (one per index: a resumed batch never
    renders an index twice, but should two markers exist, the first name wins)."""
    found: dict[int, Entry] = {}
    for name in names:
        m = NAME.match(name)
        if m is None or m["k"] is not None or m["ext"] != marker:
            continue
        index = int(m["index"])
        if index not in found or name < found[index].marker:
            found[index] = Entry(index, int(m["seed"]), name)
    return [found[i] for i in sorted(found)]


def page_bounds(offset: Any, limit: Any, default: int = 24, most: int = 100) -> tuple[int, int]:
    """(offset, limit) from query values: offset >= 0, 1 <= limit <= most; ValueError for non-numbers."""
    first = int(offset) if offset not in (None, "") else 0
    size = int(limit) if limit not in (None, "") else default
    return max(0, first), min(max(1, size), most)


def image_names(entry: Entry, sidecar: dict[str, Any] | None, fmt: str) -> list[str]:
    """The item's image files: as its sidecar lists them, else the one its name implies."""
    listed = [str(n) for n in (sidecar or {}).get("images") or [] if NAME.match(str(n))]
    if listed:
        return listed
    return [entry.marker if not entry.marker.endswith(".json") else image_name(entry.index, entry.seed, 0, fmt)]


def item_view(base: str, entry: Entry, sidecar: dict[str, Any] | None, fmt: str) -> dict[str, Any]:
    """One item of GET .../outputs (pure): URLs of its image and thumbnail, and what its sidecar says."""
    images = image_names(entry, sidecar, fmt)
    side = sidecar or {}
    return {
        "index": entry.index,
        "seed": entry.seed,
        "prompt": side.get("prompt"),
        "negativePrompt": side.get("negative_prompt"),
        "image": f"{base}/files/{images[0]}",
        "thumbnail": f"{base}/thumbnails/{images[0]}",
        "images": [f"{base}/files/{n}" for n in images],
        "parameters": side.get("parameters") or {},
        "infotext": side.get("infotext"),
        "model": side.get("model"),
    }


def sweep_start(spec: dict[str, Any], total: int | None) -> int | None:
    """The index of the first sweep cell: the items come first (items.py). Inline items are counted from
    the spec; items from a ConfigMap or file only through the status' total (None while it is unknown)."""
    sweep = spec.get("sweep") or {}
    cells = len(sweep.get("prompts") or [])
    for axis in ("loraWeights", "seeds", "cfgScales"):
        cells *= len(sweep.get(axis) or [None])
    items = spec.get("items")
    if not items:
        return 0
    if items.get("inline") is not None:
        return sum(int(i.get("count") or 1) for i in items["inline"])
    return total - cells if isinstance(total, int) else None


def evaluation_grid(
    batch: str, spec: dict[str, Any], total: int | None, entries: list[Entry], base: str, fmt: str
) -> dict[str, Any]:
    """Prompts x LoRA weights of a sweep batch (a LoRAJob's evaluation), from its finished items (pure). Cell
    (p, w) is the sweep cell at the first seed and CFG scale: index start + ((p*W + w)*S)*C; an item not
    rendered yet, or failed, is null."""
    sweep = spec.get("sweep") or {}
    prompts = [str(p) for p in sweep.get("prompts") or []]
    weights = [float(w) for w in sweep.get("loraWeights") or []]
    start = sweep_start(spec, total)
    row = max(len(weights), 1)
    inner = len(sweep.get("seeds") or [None]) * len(sweep.get("cfgScales") or [None])
    by_index = {e.index: e for e in entries}
    cells: list[list[dict[str, Any] | None]] = []
    for p in range(len(prompts)):
        line: list[dict[str, Any] | None] = []
        for w in range(row):
            entry = by_index.get(start + (p * row + w) * inner) if start is not None else None
            if entry is None:
                line.append(None)
                continue
            first = image_names(entry, None, fmt)[0]
            line.append(
                {
                    "index": entry.index,
                    "seed": entry.seed,
                    "image": f"{base}/files/{first}",
                    "thumbnail": f"{base}/thumbnails/{first}",
                }
            )
        cells.append(line)
    return {"batch": batch, "lora": sweep.get("lora"), "prompts": prompts, "weights": weights, "cells": cells}


def make_thumbnail(data: bytes, pixels: int = THUMBNAIL_PIXELS) -> bytes:
    """A JPEG whose longer side is at most `pixels` (a quarter of a 1024 image's side: a gallery cell)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (pixels, pixels))  # JPEG sources decode at a reduced size directly
        small = image.convert("RGB")
        small.thumbnail((pixels, pixels))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80, optimize=True)
        return out.getvalue()


def parse_mounts(values: Iterable[str], own_namespace: str) -> dict[tuple[str, str], Path]:
    """`[NAMESPACE/]CLAIM=PATH` flags -> {(namespace, claim): path}; a claim without a namespace is one of the
    gateway's own namespace (the only claims a pod can mount)."""
    mounts: dict[tuple[str, str], Path] = {}
    for value in values:
        claim, sep, path = value.partition("=")
        if not sep or not claim or not path:
            raise ValueError(f"--outputs-dir {value!r}: expected [NAMESPACE/]CLAIM=PATH")
        ns, _, name = claim.rpartition("/")
        mounts[(ns or own_namespace, name)] = Path(path)
    return mounts


# ---------------------------------------------------------------------------------------------
# Readers (blocking; called in threads)


class NotFound(Exception):
    pass


class Reader(Protocol):
    location: str

    def names(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...


class LocalReader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def names(self) -> list[str]:
        try:
            with os.scandir(self.root) as entries:
                return [e.name for e in entries if not TEMP.match(e.name)]
        except FileNotFoundError:
            return []  # the runner has not written anything yet

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            raise NotFound(name) from None


class S3Reader:
    """The runner's S3Store (same addressing and retries), with the batch's own credentials when given."""

    def __init__(self, s3: dict[str, Any], credentials: dict[str, str] | None) -> None:
        store = S3Store(
            str(s3["bucket"]), str(s3.get("key") or ""), endpoint=s3.get("endpoint"), region=s3.get("region")
        )
        if credentials:
            import boto3

            store.client = boto3.client(
                "s3",
                endpoint_url=s3.get("endpoint"),
                region_name=s3.get("region") or "us-east-1",
                config=store.client.meta.config,
                aws_access_key_id=credentials.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=credentials.get("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=credentials.get("AWS_SESSION_TOKEN"),
            )
        self.store = store
        self.location = store.location

    def names(self) -> list[str]:
        return list(self.store._names())

    def read(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            obj = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(name))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(name) from None
            raise
        return bytes(obj["Body"].read())


def secret_values(namespace: str, name: str) -> dict[str, str]:
    """The decoded keys of a Secret (the S3 credentials a batch names). Never logged."""
    from kubernetes import client

    from sd_operator import kube

    secret = client.CoreV1Api(kube.api_client()).read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def open_reader(
    batch: dict[str, Any],
    mounts: dict[tuple[str, str], Path],
    read_secret: Callable[[str, str], dict[str, str]] = secret_values,
) -> Reader:
    """The reader of a batch's output, or OutputsUnavailable saying what is missing (blocking)."""
    meta, output = batch["metadata"], (batch.get("spec") or {}).get("output") or {}
    ns = meta.get("namespace", "")
    if pvc := output.get("pvc"):
        claim = str(pvc.get("claimName"))
        mount = mounts.get((ns, claim))
        if mount is None:
            raise OutputsUnavailable(
                404,
                f"the outputs of {ns}/{meta['name']} are on PersistentVolumeClaim {ns}/{claim}, which is not "
                f"mounted into the gateway: mount it (a ReadWriteMany volume) with the chart value "
                f"gateway.console.outputs (or --outputs-dir {ns}/{claim}=PATH), or write batches to S3; "
                f"see docs/console.md",
            )
        root = (mount / str(pvc.get("path") or "")).resolve()
        if not root.is_relative_to(mount.resolve()):
            raise OutputsUnavailable(403, f"output path {pvc.get('path')!r} leaves the claim")
        return LocalReader(root)
    if s3 := output.get("s3"):
        credentials = None
        if secret := (s3.get("credentialsSecret") or {}).get("name"):
            try:
                credentials = read_secret(ns, secret)
            except Exception as e:
                status = getattr(e, "status", None)
                # Without permission to read it (the chart's default) the pod's own identity may still do.
                log.info(
                    "console: cannot read Secret %s/%s (%s); reading s3://%s with the gateway's own credentials",
                    ns, secret, f"HTTP {status}" if status else e.__class__.__name__, s3.get("bucket"),
                )  # fmt: skip
        return S3Reader(s3, credentials)
    raise OutputsUnavailable(404, f"{ns}/{meta['name']} names no output")


# ---------------------------------------------------------------------------------------------
# Caches


class LRU:
    """A bounded mapping: at most `max_items`, and at most `max_bytes` of bytes values."""

    def __init__(self, max_items: int, max_bytes: int | None = None) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()  # used from the store threads

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        size = len(value) if isinstance(value, bytes) else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return
        with self._lock:
            if key in self.data:
                old = self.data.pop(key)
                self.bytes -= len(old) if isinstance(old, bytes) else 0
            self.data[key] = value
            self.bytes += size
            while len(self.data) > self.max_items or (self.max_bytes is not None and self.bytes > self.max_bytes):
                _, gone = self.data.popitem(last=False)
                self.bytes -= len(gone) if isinstance(gone, bytes) else 0


@dataclass
class Listing:
    entries: list[Entry]
    read_at: float
    version: str
    phase: str


class Outputs:
    """Listings, sidecars and thumbnails of batch outputs, cached; every store access runs in a thread."""

    def __init__(self, mounts: dict[tuple[str, str], Path], thumbnail_bytes: int = 32 * 1024 * 1024) -> None:
        self.mounts = mounts
        self.readers = LRU(64)  # batch (namespace, name, uid) -> Reader (the output spec is immutable)
        self.listings = LRU(64)
        self.sidecars = LRU(4096)
        self.thumbnails = LRU(100_000, thumbnail_bytes)

    def reader(self, batch: dict[str, Any]) -> Reader:
        key = _batch_key(batch)
        reader = self.readers.get(key)
        if reader is None:
            reader = open_reader(batch, self.mounts)
            self.readers.put(key, reader)
        return reader

    def entries(self, batch: dict[str, Any]) -> list[Entry]:
        """The finished items, re-listed after LISTING_SECONDS while the batch runs; a finished batch's
        listing is kept until the object changes."""
        key, meta = _batch_key(batch), batch["metadata"]
        phase = str((batch.get("status") or {}).get("phase") or "")
        cached: Listing | None = self.listings.get(key)
        now = time.monotonic()
        fresh = cached is not None and (cached.phase in FINISHED or now - cached.read_at < LISTING_SECONDS)
        if cached is not None and fresh and cached.version == str(meta.get("resourceVersion")):
            return cached.entries
        entries = finished_items(self.reader(batch).names(), marker_ext(batch.get("spec") or {}))
        self.listings.put(key, Listing(entries, now, str(meta.get("resourceVersion")), phase))
        return entries

    def sidecar(self, batch: dict[str, Any], entry: Entry) -> dict[str, Any] | None:
        if not entry.marker.endswith(".json"):
            return None
        key = (_batch_key(batch), entry.marker)
        cached = self.sidecars.get(key)
        if cached is None:
            import json

            try:
                cached = json.loads(self.reader(batch).read(entry.marker))
            except (NotFound, ValueError):
                cached = {}
            self.sidecars.put(key, cached)
        return dict(cached) if isinstance(cached, dict) else {}

    def file(self, batch: dict[str, Any], name: str) -> tuple[bytes, str]:
        """(bytes, content type) of one image file of the batch."""
        return self.reader(batch).read(name), CONTENT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")

    def thumbnail(self, batch: dict[str, Any], name: str) -> bytes:
        key = (_batch_key(batch), name)
        cached = self.thumbnails.get(key)
        if cached is None:
            cached = make_thumbnail(self.reader(batch).read(name))
            self.thumbnails.put(key, cached)
        return bytes(cached)


def _batch_key(batch: dict[str, Any]) -> tuple[str, str, str]:
    meta = batch["metadata"]
    return (meta.get("namespace", ""), meta["name"], str(meta.get("uid") or ""))


def image_file(name: str) -> bool:
    """A name the console serves: an item's image as the runner names them (never a temporary or other file)."""
    m = NAME.match(name)
    return m is not None and m["ext"] != "json"
