"""The gateway's HTTP/1.1 client for generation requests to backends: keep-alive connections per
backend, responses parsed by httptools (llhttp, the parser behind uvicorn and Node.js).

Why not aiohttp's client here: on the hot path it was about half of the gateway's CPU per request
(request/response objects, tracing hooks, cookie and redirect machinery a hop inside the cluster
never uses), and at light load that CPU time is what the caller waits for (bench/gateway_overhead.py).
This client does one thing: send a request with a body and hand back status, headers and the body,
whole or in chunks, with flow control. Rare calls (probes, interrupts, GETs) still use aiohttp.

Errors: everything that goes wrong on the way (refused, reset, closed early, unparsable answer)
raises `UpstreamError`; a timeout raises TimeoutError. A kept-alive connection that the backend
closed while idle fails before any answer byte; that one case is retried once on a new connection,
since the backend cannot have seen the request.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

PAUSE_ABOVE = 4 * 1024 * 1024  # unread body bytes at which reading from the backend pauses


class UpstreamError(ConnectionError):
    """The backend could not be reached or broke off / garbled its answer."""


class UpstreamResponse:
    """Status and headers of an answer whose body is still arriving."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case names (the last value of a repeated header)
        self.raw_headers: list[tuple[str, str]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunks as the backend's writes came, not re-cut)."""
        conn = self._conn
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                conn.resume_if_drained(self._buffered)
                yield chunk
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            await conn.wait()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill the current response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.base_url = ""
        self.pool: Upstream | None = None  # set while the connection waits in the pool

    def set_deadline(self, deadline: float | None) -> None:
        """The exchange fails with TimeoutError at `deadline` (loop time) unless the answer is whole by then.
        (One timer handle: cheaper than cancelling the task, which is what asyncio.timeout does.)"""
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._fail(TimeoutError("the backend did not answer in time"))
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for (an idle connection): it is not usable any more
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(UpstreamError(f"unparsable answer from the backend: {e!r}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._stop_timer()
        if self.pool is not None:  # closed while idle: out of the pool
            self.pool._forget(self)
        response = self.response
        if response is not None and not response._complete and response._error is None:
            if not response.status:
                self._fail(UpstreamError(f"the backend closed the connection before answering ({exc or 'EOF'})"))
            elif "content-length" not in response.headers and not self._chunked(response):
                response._complete = True  # a body delimited by the end of the connection
            else:
                self._fail(UpstreamError(f"the backend closed the connection early ({exc or 'EOF'})"))
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        self.response.raw_headers.append(pair)
        self.response.headers[pair[0].lower()] = pair[1]

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.status = self.parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response._chunks.append(body)
        response._buffered += len(body)
        if response._buffered > PAUSE_ABOVE and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._complete = True
        self._stop_timer()
        if not self.parser.should_keep_alive():
            self.close()
        self._wake()

    # for the pool and the response
    @staticmethod
    def _chunked(response: UpstreamResponse) -> bool:
        return "chunked" in response.headers.get("transfer-encoding", "").lower()

    def _fail(self, error: BaseException) -> None:
        """The answer fails with `error` (the first one: a timeout stays a timeout when the close follows)."""
        if self.response is not None and not self.response._complete and self.response._error is None:
            self.response._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def resume_if_drained(self, buffered: int) -> None:
        if self.paused and buffered <= PAUSE_ABOVE // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def reusable(self) -> bool:
        response = self.response
        return not self.lost and response is not None and response._complete and response._error is None

    def close(self) -> None:
        self.lost = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """Keep-alive connection pools, one per backend address."""

    def __init__(self, idle_seconds: float = 20.0, tls: ssl.SSLContext | None = None) -> None:
        # Shorter than the WebUI's keep-alive (its --timeout-keep-alive, 30 s by default): we drop a connection
        # before the backend does, so the stale-connection race is rare (and handled when it happens, e.g.
        # behind a server with a shorter limit, such as plain uvicorn's 5 s).
        self.idle_seconds = idle_seconds
        self._idle: dict[str, list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, ssl.SSLContext | None, str]] = {}
        # For https backends: one context for all (building one takes milliseconds); the system's CAs unless given.
        self._tls = tls

    def _target(self, base_url: str) -> tuple[str, int, ssl.SSLContext | None, str]:
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamError(f"not an http(s) URL: {base_url!r}")
            tls = None
            if parts.scheme == "https":
                tls = self._tls = self._tls or ssl.create_default_context()
            port = parts.port or (443 if tls else 80)
            target = (parts.hostname, port, tls, parts.netloc.encode("idna").decode())  # the Host header
            self._targets[base_url] = target
        return target

    async def _connect(self, base_url: str, deadline: float | None) -> tuple[_Connection, bool]:
        """A connection to the backend and whether it was reused from the pool."""
        idle = self._idle.get(base_url)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            conn.pool = None
            if not conn.lost and now - conn.idle_since < self.idle_seconds:
                return conn, True
            conn.close()
        host, port, tls, _ = self._target(base_url)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(_Connection, host, port, ssl=tls)
        except TimeoutError:
            raise
        except OSError as e:
            raise UpstreamError(f"cannot connect to {base_url}: {e}") from e
        conn.base_url = base_url
        return conn, False

    def _release(self, base_url: str, conn: _Connection) -> None:
        conn._stop_timer()
        if conn.reusable():
            conn.response = None
            conn.idle_since = time.monotonic()
            conn.pool = self
            self._idle.setdefault(base_url, []).append(conn)
        else:
            conn.close()

    def _forget(self, conn: _Connection) -> None:
        """A pooled connection closed (by the backend, or gone with its pod): no entry is left behind."""
        conn.pool = None
        idle = self._idle.get(conn.base_url)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.base_url]
                self._targets.pop(conn.base_url, None)

    async def _send(
        self, base_url: str, method: str, path: str, body: bytes, content_type: str, deadline: float | None
    ) -> tuple[_Connection, UpstreamResponse]:
        host = self._target(base_url)[3]
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            # identity: the bytes are relayed as they come; compressing inside the cluster only costs CPU
            f"Content-Length: {len(body)}\r\nAccept: */*\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode("latin-1")
        for attempt in (0, 1):
            conn, reused = await self._connect(base_url, deadline)
            response = conn.response = UpstreamResponse(conn)
            conn.set_deadline(deadline)
            assert conn.transport is not None
            if len(body) > 65536:
                conn.transport.writelines((head, body))  # a large body is not copied to join it to the head
            else:
                conn.transport.write(head + body)  # one segment
            try:
                while not response.status:
                    if response._error is not None:
                        raise response._error
                    if conn.lost and response._error is None:
                        raise UpstreamError("the backend closed the connection before answering")
                    await conn.wait()
            except UpstreamError:
                conn.close()
                if reused and attempt == 0 and not response.status:
                    continue  # a stale kept-alive connection: the backend never saw this request
                raise
            except BaseException:
                conn.close()
                raise
            return conn, response
        raise AssertionError("unreachable")

    def request(
        self,
        base_url: str,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> _Exchange:
        """`async with upstream.request(url, "POST", path, body, timeout=…) as response:` — the connection
        goes back to the pool when the body was read whole, and is closed otherwise. `timeout` (seconds)
        covers connecting, sending and the whole answer."""
        return _Exchange(self, base_url, method, path, body, content_type, timeout)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


@dataclass
class _Exchange:
    """One request's `async with`: sends on entry, gives the connection back (or closes it) on exit."""

    pool: Upstream
    base_url: str
    method: str
    path: str
    body: bytes
    content_type: str
    timeout: float | None
    conn: _Connection | None = None

    async def __aenter__(self) -> UpstreamResponse:
        deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout
        self.conn, response = await self.pool._send(
            self.base_url, self.method, self.path, self.body, self.content_type, deadline
        )
        return response

    async def __aexit__(self, *exc: Any) -> None:
        if self.conn is not None:
            self.pool._release(self.base_url, self.conn)
