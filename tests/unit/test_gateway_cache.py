"""The gateway's result cache: the in-memory LRU, and RedisCache against a real redis-server process."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from sd_operator.gateway.cache import (
    KEY_PREFIX,
    CachedResponse,
    MemoryCache,
    RedisCache,
    ResultCache,
    cache_key,
    make_cache,
    redact_url,
)

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
PASSWORD = "s3cret"
MiB = 1024 * 1024


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Runs an async test body on a fresh event loop: the project does not use pytest-asyncio."""

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a real redis-server ---------------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server subprocess on 127.0.0.1 that the test can stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            # Not a skip: the Makefile installs it, and a silently skipped cache suite would hide regressions.
            pytest.fail("redis-server not installed: run `make deps`")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, socket_timeout=2)

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--requirepass", PASSWORD, "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as logfile:
            self.proc = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")
                pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{log}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    pytest.fail("redis-server did not answer PING within 10s")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fast_cache(url: str, **kwargs: Any) -> RedisCache:
    """A RedisCache that does not rest after an error, so each operation in a test really reaches Redis."""
    return RedisCache(url, **{"retry_after": 0.0, **kwargs})


# --- keys and values -------------------------------------------------------------------------------------------------


def test_cache_key_binds_model_and_request() -> None:
    key = cache_key("abc123", '{"prompt":"a cat","seed":1}')
    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 64
    assert key == cache_key("abc123", '{"prompt":"a cat","seed":1}')
    assert key != cache_key("abc124", '{"prompt":"a cat","seed":1}')
    assert key == KEY_PREFIX + hashlib.sha256(b'abc123\n{"prompt":"a cat","seed":1}').hexdigest()
    # The separator keeps a character from moving across the model/request boundary unnoticed.
    assert cache_key("ab", "c") != cache_key("a", "bc")


def test_cached_response_round_trip_and_foreign_values() -> None:
    packed = CachedResponse(b'{"images": ["iVBOR..."]}\n', "application/json").encode()
    assert CachedResponse.decode(packed) == CachedResponse(b'{"images": ["iVBOR..."]}\n', "application/json")
    assert CachedResponse.decode(b'{"images": []}') is None
    assert CachedResponse.decode(CachedResponse.MAGIC + b"no newline after the type") is None
    with pytest.raises(ValueError, match="one line"):
        CachedResponse(b"", "text/plain\nX-Injected: 1").encode()


# --- MemoryCache ----------------------------------------------------------------------------------------------------


def test_memory_lru_evicts_oldest_by_bytes_and_keeps_recently_read() -> None:
    async def body() -> None:
        cache = MemoryCache(max_bytes=1000, max_entry_bytes=400)
        await cache.set("a", b"a" * 300)
        await cache.set("b", b"b" * 300)
        await cache.set("c", b"c" * 300)
        assert await cache.get("a") == b"a" * 300  # "a" is now the most recently used; "b" the oldest
        await cache.set("d", b"d" * 300)  # 1200 bytes > 1000: exactly one entry must go
        assert "b" not in cache
        assert await cache.get("a") == b"a" * 300
        assert await cache.get("c") == b"c" * 300
        assert await cache.get("d") == b"d" * 300
        stats = cache.stats()
        assert stats["bytes"] == 900
        assert stats["entries"] == 3
        assert stats["evictions"] == 1

    run(body)


def test_memory_bounded_by_entry_count_and_replacement_accounting() -> None:
    async def body() -> None:
        cache = MemoryCache(max_bytes=10_000, max_entries=2)
        await cache.set("a", b"1" * 10)
        await cache.set("b", b"2" * 10)
        await cache.set("a", b"3" * 50)  # a replacement, not a new entry: nothing evicted, bytes re-counted
        assert (cache.stats()["entries"], cache.stats()["bytes"], cache.stats()["evictions"]) == (2, 60, 0)
        await cache.set("c", b"4" * 10)  # "b" is the least recently used now
        assert "b" not in cache
        assert await cache.get("a") == b"3" * 50
        assert cache.stats()["evictions"] == 1

    run(body)


def test_memory_skips_oversized_entries() -> None:
    async def body() -> None:
        cache = MemoryCache(max_bytes=8000)  # max_entry_bytes defaults to an eighth: 1000
        assert cache.max_entry_bytes == 1000
        await cache.set("small", b"x" * 1000)
        await cache.set("big", b"x" * 1001)
        assert "big" not in cache
        assert await cache.get("small") == b"x" * 1000
        # Replacing a value with an oversized one drops the old value rather than keep serving it.
        await cache.set("small", b"y" * 5000)
        assert await cache.get("small") is None
        assert cache.stats()["bytes"] == 0

    run(body)


def test_memory_ttl_expiry() -> None:
    async def body() -> None:
        cache = MemoryCache(max_bytes=10_000)
        await cache.set("short", b"s", ttl_seconds=0.05)
        await cache.set("forever", b"f")
        await cache.set("never", b"n", ttl_seconds=0)  # a non-positive TTL is already expired
        assert await cache.get("short") == b"s"
        await asyncio.sleep(0.08)
        assert await cache.get("short") is None
        assert "short" not in cache  # dropped, not just hidden
        assert await cache.get("forever") == b"f"
        assert "never" not in cache
        stats = cache.stats()
        assert stats["expired"] == 1
        assert (stats["entries"], stats["bytes"]) == (1, 1)

    run(body)


def test_memory_stats_count_hits_misses_sets() -> None:
    async def body() -> None:
        cache = MemoryCache()
        assert set(cache.stats()) >= {"hits", "misses", "sets", "evictions", "bytes", "entries", "errors"}
        await cache.set("k", b"v")
        await cache.set("k", b"w")
        assert await cache.get("k") == b"w"
        assert await cache.get("k") == b"w"
        assert await cache.get("missing") is None
        assert cache.stats() == {
            "hits": 2,
            "misses": 1,
            "sets": 2,
            "evictions": 0,
            "expired": 0,
            "bytes": 1,
            "entries": 1,
            "errors": 0,
        }
        await cache.close()
        assert cache.stats()["entries"] == 0

    run(body)


def test_memory_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryCache(max_bytes=0)
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCache(max_entries=0)


# --- RedisCache against a real redis-server -------------------------------------------------------------------------


def test_redis_round_trip_of_a_multi_megabyte_value(redis_server: RedisServer) -> None:
    value = CachedResponse(os.urandom(5 * MiB), "application/json").encode()
    key = cache_key("model", "request")

    async def body() -> RedisCache:
        cache = RedisCache(redis_server.url, max_entry_bytes=32 * MiB)
        assert isinstance(cache, ResultCache)
        assert await cache.get(key) is None
        await cache.set(key, value)
        got = await cache.get(key)
        assert got == value
        await cache.close()
        return cache

    cache = run(body)
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "sets": 1,
        "evictions": 0,
        "expired": 0,
        "bytes": 0,
        "entries": 0,
        "errors": 0,
    }
    with redis_server.client() as c:
        assert c.ttl(key) == -1  # no TTL given: no expiry


def test_redis_ttl_is_set_with_px(redis_server: RedisServer) -> None:
    async def body() -> None:
        cache = RedisCache(redis_server.url)
        await cache.set("short", b"v", ttl_seconds=0.2)
        with redis_server.client() as c:
            pttl = c.pttl("short")
        assert 0 < pttl <= 200
        assert await cache.get("short") == b"v"
        await asyncio.sleep(0.3)
        assert await cache.get("short") is None
        await cache.close()

    run(body)


def test_redis_skips_oversized_values(redis_server: RedisServer) -> None:
    async def body() -> None:
        cache = RedisCache(redis_server.url, max_entry_bytes=1000)
        await cache.set("big", b"x" * 1001)
        await cache.set("small", b"x" * 1000)
        assert cache.stats()["sets"] == 1
        await cache.close()

    run(body)
    with redis_server.client() as c:
        assert c.exists("big") == 0
        assert c.exists("small") == 1


def test_redis_down_mid_test_degrades_to_misses(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sd_operator.gateway.cache")

    async def body() -> RedisCache:
        cache = fast_cache(redis_server.url)
        await cache.set("k", b"v")
        assert await cache.get("k") == b"v"
        redis_server.stop()
        started = time.monotonic()
        assert await cache.get("k") is None
        await cache.set("k2", b"v2")  # must not raise
        assert time.monotonic() - started < 2
        assert cache.stats()["errors"] == 2
        # Back on the same port, the next operation reconnects (the pooled connection is stale by now).
        redis_server.start()
        await cache.set("k3", b"v3")
        assert await cache.get("k3") == b"v3"
        await cache.close()
        return cache

    cache = run(body)
    stats = cache.stats()
    assert stats["errors"] == 2
    assert (stats["hits"], stats["misses"], stats["sets"]) == (2, 1, 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "a dead Redis must be reported once per interval, not per request"
    assert f"redis://:****@127.0.0.1:{redis_server.port}/0" in caplog.text
    assert PASSWORD not in caplog.text


def test_redis_wrong_password_is_an_error_not_an_exception(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sd_operator.gateway.cache")
    url = f"redis://:wr0ng-pass@127.0.0.1:{redis_server.port}/0"

    async def body() -> RedisCache:
        cache = fast_cache(url)
        assert await cache.get("k") is None
        await cache.set("k", b"v")
        await cache.close()
        return cache

    assert run(body).stats()["errors"] == 2
    assert caplog.records
    assert "wr0ng-pass" not in caplog.text


def test_redis_that_hangs_costs_one_timeout_then_rests() -> None:
    # A listening socket that never answers: the kernel accepts the connection, and no reply ever comes.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]

        async def body() -> RedisCache:
            cache = RedisCache(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2, connect_timeout=0.2, retry_after=30)
            started = time.monotonic()
            assert await cache.get("k") is None
            first = time.monotonic() - started
            assert first < 1.5, f"one GET against a hung Redis took {first:.2f}s"
            started = time.monotonic()
            for _ in range(20):  # resting: no more round trips to the hung server
                assert await cache.get("k") is None
                await cache.set("k", b"v")
            assert time.monotonic() - started < 0.1
            await cache.close()
            return cache

        stats = run(body).stats()
    assert stats["errors"] == 1
    assert stats["misses"] == 21
    assert stats["sets"] == 0


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@127.0.0.1:6380/0") == "redis://:****@127.0.0.1:6380/0"
    assert redact_url("rediss://user:s3cret@redis.example:6380/1") == "rediss://user:****@redis.example:6380/1"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
    assert redact_url("unix:///run/redis.sock?db=1&password=s3cret") == "unix:///run/redis.sock?db=1&password=****"
    assert "s3cret" not in redact_url("redis://:s3cret@[::1]:6379/0")


# --- make_cache ------------------------------------------------------------------------------------------------------


def test_make_cache_dispatch() -> None:
    for empty in (None, "", "  "):
        memory = make_cache(empty, 4096)
        assert isinstance(memory, MemoryCache)
        assert (memory.max_bytes, memory.max_entry_bytes) == (4096, 512)
    for url in ("redis://cache:6379/0", "rediss://:pw@cache:6380/0", "unix:///run/redis.sock", "REDIS://cache"):
        remote = make_cache(url, 8 * MiB)
        assert isinstance(remote, RedisCache)
        assert remote.max_entry_bytes == MiB
        assert "pw" not in repr(remote)
        run(remote.close)


def test_make_cache_rejects_other_urls() -> None:
    for url in ("memcached://cache:11211", "http://:s3cret@cache:6379", "cache:6379"):
        with pytest.raises(ValueError, match="unsupported result cache URL") as info:
            make_cache(url, MiB)
        assert "redis://" in str(info.value)
        assert "s3cret" not in str(info.value)
