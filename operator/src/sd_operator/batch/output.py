"""Output files: names, image conversion, and the two stores (a mounted folder, an S3-compatible bucket).

An item's files are `{index:06d}-{seed}.{ext}` (and `-{k}` for the k-th image of a batch_size > 1
request) plus the sidecar `{index:06d}-{seed}.json`. Images are written first and the sidecar last: the
sidecar is the item's commit marker, so an item with images but no sidecar counts as not done. Without
sidecars (metadata: false) the plain-named first image is written last and is the marker instead.
Every write is atomic: a dot-named temporary file renamed into place, or a single-part S3 put.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sd_operator.api.generationbatch import ImageFormat

NAME = re.compile(r"^(?P<index>\d+)-(?P<seed>\d+)(?:-(?P<k>\d+))?\.(?P<ext>png|jpeg|webp|json)$")
# Temporary files of an interrupted write (a killed runner): `.<final name>.<random>.tmp`.
TEMP = re.compile(r"^\.\d+-\d+(?:-\d+)?\.(?:png|jpeg|webp|json)\.[0-9a-f]+\.tmp$")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
Mark = Callable[[int], None]


def image_name(index: int, seed: int, k: int, ext: str) -> str:
    return f"{index:06d}-{seed}-{k}.{ext}" if k else f"{index:06d}-{seed}.{ext}"


def sidecar_name(index: int, seed: int) -> str:
    return f"{index:06d}-{seed}.json"


def marker_index(name: str, marker_ext: str) -> int | None:
    """The index of a finished item when `name` is its commit marker (sidecar, or first image), else None."""
    found = NAME.match(name)
    if found is None or found["k"] is not None or found["ext"] != marker_ext:
        return None
    return int(found["index"])


def encode(png: bytes, fmt: ImageFormat, quality: int = 92) -> bytes:
    """The image in the batch's format; PNGs (what the WebUI answers) pass through untouched."""
    if fmt == ImageFormat.PNG:
        return png
    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        if fmt == ImageFormat.JPEG:
            image.convert("RGB").save(out, "JPEG", quality=quality)
        else:
            image.save(out, "WEBP", quality=quality)
        return out.getvalue()


class Store(Protocol):
    """Where a batch's files go. Methods block: the runner calls them in worker threads."""

    location: str

    def scan(self, marker_ext: str, mark: Mark) -> int:
        """Calls `mark(index)` for every finished item; returns how many markers were found."""

    def put(self, name: str, data: bytes) -> None:
        """Writes one file atomically."""


class LocalStore:
    """A folder (the mounted PersistentVolumeClaim path)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def scan(self, marker_ext: str, mark: Mark) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        found = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if TEMP.match(entry.name):
                    # Left by a runner killed mid-write; the item has no marker and is rendered again.
                    Path(entry.path).unlink(missing_ok=True)
                elif (index := marker_index(entry.name, marker_ext)) is not None:
                    mark(index)
                    found += 1
        return found

    def put(self, name: str, data: bytes) -> None:
        temp = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            with temp.open("wb") as f:
                f.write(data)
                # Durable before it is visible: a sidecar must never name an image a node crash could lose.
                f.flush()
                os.fsync(f.fileno())
            temp.replace(self.root / name)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


class S3Store:
    """A bucket and key prefix; a single-part put_object is atomic (an object is all there or absent)."""

    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None, region: str | None, pool: int = 10) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # Path-style addressing: S3-compatible stores (MinIO, Ceph, moto) are often reached by IP or
        # a cluster DNS name that virtual-hosted bucket names would not resolve under.
        config = Config(
            max_pool_connections=max(pool, 10),
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint else {},
        )
        # Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the pod's identity.
        self.client: Any = boto3.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _names(self) -> Iterator[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents") or []:
                yield obj["Key"][len(start) :]

    def scan(self, marker_ext: str, mark: Mark) -> int:
        found = 0
        for name in self._names():
            if (index := marker_index(name, marker_ext)) is not None:
                mark(index)
                found += 1
        return found

    def put(self, name: str, data: bytes) -> None:
        ext = name.rsplit(".", 1)[-1]
        content_type = CONTENT_TYPES.get(ext, "application/octet-stream")
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, ContentType=content_type)


def commit(store: Store, files: list[tuple[str, bytes]], sidecar: tuple[str, bytes] | None) -> None:
    """Writes an item's files so that its marker comes last: images k>0, the first image, then the sidecar."""
    for name, data in [*files[1:], *files[:1]]:
        store.put(name, data)
    if sidecar is not None:
        store.put(*sidecar)
