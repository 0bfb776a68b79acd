"""The runner's side of the services layer: model and preset look-ups, txt2img, and what an error means.

Retriable: connection errors, timeouts, 408, 429 (with Retry-After), 500 that is not out of memory,
502/503/504. Waited out (up to the item timeout, without spending retries): no instance of the model
right now (404 UnknownModel, 503 NoBackend or ModelNotReady while its instances start or restart).
Permanent: every other 4xx (400 validation, 413/422) and any OutOfMemoryError answer, which the same
request would only repeat.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sd_operator.batch.payload import PermanentItemError

RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
_TITLE_HASH = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,10})\]$")


class GatewayUnusable(Exception):
    """The services layer cannot serve this batch at all (unreachable, refuses the key, unknown model)."""


class RetriableError(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class FleetUnavailable(RetriableError):
    """No instance of the model right now (it restarts, or is scaled to zero): wait, without spending the
    item's retries; the model was confirmed when the runner started."""


@dataclass
class Answer:
    images: list[bytes]
    info: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None


def backoff(attempt: int, retry_after: float | None = None, rand: Callable[[], float] = random.random) -> float:
    """Exponential with jitter: half of min(cap, base*2^attempt) plus up to the other half at random, so
    runners that failed together do not retry together. A Retry-After is a floor, not a suggestion."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    delay = ceiling / 2 + rand() * ceiling / 2
    return max(delay, retry_after) if retry_after else delay


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: the backoff applies instead
        return None


def classify(status: int, data: bytes, retry_after: str | None = None) -> Exception:
    """The exception for a non-200 answer: RetriableError or PermanentItemError."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    kind, detail = ("", "")
    if isinstance(doc, dict):
        kind, detail = str(doc.get("error") or ""), str(doc.get("detail") or doc.get("errors") or "")
    else:
        detail = data[:300].decode(errors="replace")
    reason = f"HTTP {status}{f' {kind}' if kind else ''}: {detail}".strip().rstrip(":")
    if kind == "OutOfMemoryError" or "out of memory" in detail.lower():
        return PermanentItemError(reason)
    if kind in ("UnknownModel", "NoBackend", "ModelNotReady") or (status == 503 and not kind):
        return FleetUnavailable(reason, _retry_after(retry_after))
    if status in RETRIABLE_STATUS:
        return RetriableError(reason, _retry_after(retry_after))
    return PermanentItemError(reason)


def parse_answer(data: bytes, expected: int, backend: str | None = None) -> Answer:
    """The images of a 200 answer. The WebUI appends extras (e.g. ControlNet's detected maps) after the
    generated images, so only the first `expected` are the item's."""
    try:
        doc = json.loads(data)
        images = [base64.b64decode(b64, validate=True) for b64 in (doc.get("images") or [])[:expected]]
    except (ValueError, AttributeError, TypeError, binascii.Error) as e:
        raise RetriableError(f"unreadable answer ({e.__class__.__name__})") from None
    if not images:
        raise RetriableError("the answer has no images")
    try:
        info = json.loads(doc.get("info") or "{}")
    except (ValueError, TypeError):
        info = {}
    return Answer(images, info if isinstance(info, dict) else {}, backend)


def model_names(entry: dict[str, Any]) -> set[str]:
    filename = str(entry.get("filename") or "")
    names = {filename, filename.rsplit(".", 1)[0], entry.get("title"), entry.get("model_name"), entry.get("hash")}
    if sha := entry.get("sha256"):
        names |= {sha, sha[:8], sha[:10]}
    return {str(n).lower() for n in names if n}


def match_model(models: list[dict[str, Any]], wanted: str) -> list[dict[str, Any]]:
    """The /v1/models entries a model name means, by file name, title, stem or hash, as the gateway routes."""
    candidates = {wanted.strip().lower()}
    if found := _TITLE_HASH.match(wanted.strip()):
        candidates |= {found["name"].lower(), found["hash"].lower()}
    return [m for m in models if candidates & model_names(m)]


class GatewayClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, priority: int, timeout: float) -> None:
        self.session, self.url, self.model = session, url.rstrip("/"), model
        self.headers = {"X-SD-Model": model, "X-Priority": str(priority)}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def get_json(self, path: str) -> Any:
        """A GET at start-up; GatewayUnusable when it does not answer usefully."""
        try:
            async with self.session.get(f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=15)) as r:
                if r.status in (401, 403):
                    raise GatewayUnusable(f"the services layer refused the API key on {path} (HTTP {r.status})")
                if r.status != 200:
                    raise GatewayUnusable(f"GET {path} answered HTTP {r.status}: {(await r.text())[:200]}")
                return await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            why = f"{e.__class__.__name__}: {e}"
            raise GatewayUnusable(f"the services layer at {self.url} is unreachable ({why})") from None

    async def txt2img(self, body: dict[str, Any]) -> tuple[int, bytes, str | None, str | None]:
        """(status, body, Retry-After, X-SD-Backend); RetriableError on connection errors and timeouts."""
        try:
            async with self.session.post(
                f"{self.url}/sdapi/v1/txt2img", json=body, headers=self.headers, timeout=self.timeout
            ) as r:
                data = await r.read()
                return r.status, data, r.headers.get("Retry-After"), r.headers.get("X-SD-Backend")
        except TimeoutError:
            raise RetriableError(f"no answer within {self.timeout.total:.0f}s") from None
        except aiohttp.ClientError as e:
            raise RetriableError(f"{e.__class__.__name__}: {e}") from None
