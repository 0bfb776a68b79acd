"""The gateway's result cache for deterministic generation requests.

A txt2img/img2img request with a fixed seed on a given model always produces the same answer, so the gateway
can serve a repeat from a cache instead of a GPU. The key binds the model's hash to the canonical form of the
request; the value is the response body (JSON with base64 PNGs, often several MB) plus its content type,
packed into one byte string by `CachedResponse`.

Two backends share the `ResultCache` protocol: `MemoryCache` (per replica, LRU bounded by bytes) and
`RedisCache` (shared by all replicas). A cache is an optimisation, never a dependency: `RedisCache` turns every
Redis failure into a miss or a skipped write, so a dead Redis costs latency of at most one socket timeout, not
failed requests.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("sd_operator.gateway.cache")

KEY_PREFIX = "sdgw:v1:"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
REDIS_SCHEMES = ("redis", "rediss", "unix")

# The keys every backend's stats() returns, so the gateway's metrics code can read them without caring which
# backend it has. "expired" is kept apart from "evictions" because they call for different fixes (TTL vs size).
STAT_KEYS = ("hits", "misses", "sets", "evictions", "expired", "bytes", "entries", "errors")


def cache_key(model_hash: str, canonical_request: str) -> str:
    """The cache key of a request: prefix + sha256(model_hash, newline, canonical request).

    The newline separates the two parts so that characters cannot move across the boundary unnoticed (a model
    hash is hex, never a newline); the version in the prefix lets a change of value format start afresh.
    """
    digest = hashlib.sha256(f"{model_hash}\n{canonical_request}".encode()).hexdigest()
    return KEY_PREFIX + digest


@dataclass(frozen=True)
class CachedResponse:
    """A response body with its content type, packed as `MAGIC + content_type + b"\\n" + body`.

    The protocol stores plain bytes; this is the one place that knows how a content type travels with them.
    """

    body: bytes
    content_type: str = "application/json"

    MAGIC = b"sdgw1\n"

    def encode(self) -> bytes:
        ctype = self.content_type.encode("ascii")
        if b"\n" in ctype or b"\r" in ctype:
            raise ValueError(f"content type must be one line: {self.content_type!r}")
        return self.MAGIC + ctype + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CachedResponse | None:
        """The response packed in `raw`, or None when `raw` is not a value this module wrote.

        None rather than an exception because a foreign or truncated value in a shared Redis should read as a
        miss: the gateway then generates the answer and overwrites it.
        """
        if not raw.startswith(cls.MAGIC):
            return None
        ctype, sep, body = raw[len(cls.MAGIC) :].partition(b"\n")
        if not sep:
            return None
        try:
            return cls(body=body, content_type=ctype.decode("ascii"))
        except UnicodeDecodeError:
            return None


@runtime_checkable
class ResultCache(Protocol):
    """What the gateway needs from a cache. Implementations never raise for a backend failure."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters since start (hits, misses, sets, evictions, expired, errors) and gauges (bytes, entries)."""
        ...


def redact_url(url: str) -> str:
    """`url` with its password (userinfo or ?password=) replaced by ****, for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        # An unparsable URL may still hold a secret somewhere; show only what cannot be one.
        return "<unparsable URL>"
    netloc = parts.netloc
    if password is not None:
        host = hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        if port is not None:
            host = f"{host}:{port}"
        netloc = f"{parts.username or ''}:****@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "****" if k.lower() == "password" else v) for k, v in pairs], safe="*/")
    if "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # Built by hand because urlunsplit drops the empty authority of unix:///path, which changes the URL's form.
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def _url_secrets(url: str) -> list[str]:
    """The secrets in `url`, to scrub from exception messages before they are logged."""
    try:
        parts = urlsplit(url)
        secrets = [parts.password] if parts.password else []
    except ValueError:
        return []
    secrets += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return secrets


class MemoryCache:
    """An in-process LRU cache bounded by the total size of its values (and optionally by entry count).

    Every method runs without awaiting anything, so on one event loop each operation is atomic: no lock is
    needed. The OrderedDict keeps recency order (oldest first), which makes get, set and eviction O(1).
    Sizes count value bytes only; keys and Python object overhead are small next to multi-MB responses.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        max_entries: int | None = None,
        max_entry_bytes: int | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if max_entries is not None and max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        # One huge answer must not flush the whole cache, hence the default of an eighth of the budget.
        self.max_entry_bytes = min(max_entry_bytes if max_entry_bytes is not None else max_bytes // 8, max_bytes)
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()  # key -> (value, expires at)
        self._bytes = 0
        self._hits = self._misses = self._sets = self._evictions = self._expired = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        value, expires_at = entry
        if expires_at is not None and time.monotonic() >= expires_at:
            # Dropped on read; an expired entry nobody reads again ages out through LRU eviction instead.
            self._remove(key)
            self._expired += 1
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return value

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        # A replacement drops the old value first, also when the new one is not stored: the caller asked for
        # the new value, so keeping the old one would serve something the caller has replaced.
        if key in self._entries:
            self._remove(key)
        if len(value) > self.max_entry_bytes:
            return
        if ttl_seconds is not None and ttl_seconds <= 0:
            return  # already expired
        expires_at = None if ttl_seconds is None else time.monotonic() + ttl_seconds
        self._entries[key] = (bytes(value), expires_at)
        self._bytes += len(value)
        self._sets += 1
        while self._bytes > self.max_bytes or (self.max_entries is not None and len(self._entries) > self.max_entries):
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self._evictions += 1

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "hits": self._hits,
            "misses": self._misses,
            "sets": self._sets,
            "evictions": self._evictions,
            "expired": self._expired,
            "bytes": self._bytes,
            "entries": len(self._entries),
            "errors": 0,
        }

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is held (expired or not), without counting a lookup or touching recency."""
        return key in self._entries

    def _remove(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= len(value)


class RedisCache:
    """A cache in Redis, shared by all gateway replicas. Redis failures become misses and skipped writes.

    Expiry is Redis's own (SET ... PX), and so is eviction under memory pressure (its maxmemory policy):
    stats() reports "bytes", "entries", "evictions" and "expired" as 0 because only Redis knows them.
    "errors" counts failed Redis operations; a failed get also counts as a miss, as the gateway sees one.

    After a failure the cache leaves Redis alone for `retry_after` seconds (gets are misses, sets are
    skipped), so a Redis that hangs costs one socket timeout per `retry_after`, not one per request.
    """

    def __init__(
        self,
        url: str,
        *,
        max_entry_bytes: int = DEFAULT_MAX_BYTES // 8,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retry_after: float = 1.0,
        warn_interval: float = 30.0,
    ) -> None:
        self.url = redact_url(url)  # only the redacted form is kept where logs or reprs could show it
        self._secrets = _url_secrets(url)
        self.max_entry_bytes = max_entry_bytes
        self.retry_after = retry_after
        self.warn_interval = warn_interval
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # One immediate retry on a connection error covers the pooled connection that a Redis restart
            # broke; timeouts are not retried, since a hanging Redis would then stall a request twice as long.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._down_until = 0.0
        self._last_warning: float | None = None
        self._suppressed = 0
        self._hits = self._misses = self._sets = self._errors = 0

    def __repr__(self) -> str:
        return f"RedisCache({self.url!r})"

    async def get(self, key: str) -> bytes | None:
        if self._resting():
            self._misses += 1
            return None
        try:
            value = await self._client.get(key)
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError and raw socket errors
            self._failed("GET", exc)
            self._misses += 1
            return None
        if value is None:
            self._misses += 1
            return None
        self._hits += 1
        # The client does not decode responses, so this is bytes; the str branch only satisfies the stubs.
        return value.encode() if isinstance(value, str) else bytes(value)

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        if len(value) > self.max_entry_bytes or self._resting():
            return
        if ttl_seconds is not None and ttl_seconds <= 0:
            return  # already expired; Redis would reject PX 0 anyway
        # PX takes whole milliseconds; rounding up keeps a tiny TTL from becoming "no expiry" or an error.
        px = None if ttl_seconds is None else max(1, math.ceil(ttl_seconds * 1000))
        try:
            await self._client.set(key, value, px=px)
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError and raw socket errors
            self._failed("SET", exc)
            return
        self._sets += 1

    async def close(self) -> None:
        await self._client.aclose()

    def stats(self) -> dict[str, int]:
        return {
            "hits": self._hits,
            "misses": self._misses,
            "sets": self._sets,
            "evictions": 0,
            "expired": 0,
            "bytes": 0,
            "entries": 0,
            "errors": self._errors,
        }

    def _resting(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, op: str, exc: BaseException) -> None:
        self._errors += 1
        now = time.monotonic()
        self._down_until = now + self.retry_after
        # One warning per interval: a dead Redis fails every request, and a log line per request would drown
        # the logs (and cost more than the cache saves).
        if self._last_warning is not None and now - self._last_warning < self.warn_interval:
            self._suppressed += 1
            return
        message = str(exc)
        for secret in self._secrets:  # redis-py does not put passwords in messages today; make sure of it
            message = message.replace(secret, "****")
        suppressed = f" ({self._suppressed} more errors since the last warning)" if self._suppressed else ""
        log.warning(
            "result cache: Redis %s at %s failed, serving without the cache: %s: %s%s",
            op,
            self.url,
            type(exc).__name__,
            message,
            suppressed,
        )
        self._last_warning = now
        self._suppressed = 0


def make_cache(url: str | None, max_bytes: int = DEFAULT_MAX_BYTES) -> ResultCache:
    """The cache the gateway's settings ask for: no URL -> MemoryCache, a Redis URL -> RedisCache.

    `max_bytes` bounds the memory cache; for Redis (whose memory is its own maxmemory) it only sets the
    largest value worth storing, an eighth of it, as for the memory cache.
    """
    if url is None or not url.strip():
        return MemoryCache(max_bytes)
    url = url.strip()
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"unsupported result cache URL {redact_url(url)!r}: expected redis://, rediss:// or unix://, "
            "or an empty value for the in-memory cache"
        )
    return RedisCache(url, max_entry_bytes=max_bytes // 8)
