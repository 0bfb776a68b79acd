"""gateway/upstream.py, the gateway's HTTP/1.1 client for generation requests, against scripted backends on
127.0.0.1 sockets: each test's backend answers in one precise way (lengths, chunks, early closes, stalls)
that a WebUI or a proxy in front of it can produce, which the emulator cannot be made to do on purpose."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sd_operator.gateway import upstream as up
from sd_operator.gateway.upstream import Upstream, UpstreamError

pytestmark = pytest.mark.timeout(30)


@dataclass
class Seen:
    """What one request looked like on the wire."""

    connection: int  # which TCP connection (0, 1, …) it came on
    number: int  # its position on that connection (0 = first)
    head: list[str]
    body: bytes
    reader: asyncio.StreamReader = field(repr=False)


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection afterwards


@dataclass
class Backend:
    answer: Answer
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    eofs: int = 0  # connections the client closed
    url: str = ""
    server: Any = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection, self.connections = self.connections, self.connections + 1
        number = 0
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
                except asyncio.IncompleteReadError:
                    self.eofs += 1
                    return
                length = next((int(h.split(":")[1]) for h in head if h.lower().startswith("content-length:")), 0)
                seen = Seen(connection, number, head, await reader.readexactly(length), reader)
                self.seen.append(seen)
                number += 1
                if not await self.answer(seen, writer):
                    return
                await writer.drain()
        except ConnectionError:
            pass  # the client went away mid-answer (some tests make it)
        finally:
            writer.close()

    tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def plain(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def fetch(pool: Upstream, url: str, body: bytes = b"{}", seconds: float | None = 5.0) -> tuple[int, Any, bytes]:
    async with pool.request(url, "POST", "/sdapi/v1/txt2img", body, timeout=seconds) as response:
        return response.status, response.headers, await response.read()


def test_sends_method_path_host_length_and_body_and_reuses_the_connection() -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(plain(b'{"n":%d}' % len(backend.seen), extra="X-Test: yes\r\n"))
        return True

    async def main() -> None:
        pool = Upstream()
        async with backend:
            first = await fetch(pool, backend.url, b'{"prompt":"a cat"}')
            second = await fetch(pool, backend.url, b'{"prompt":"a dog"}')
        pool.close()
        assert first == (200, {"content-type": "application/json", "content-length": "7", "x-test": "yes"}, b'{"n":1}')
        assert second[2] == b'{"n":2}'
        head = backend.seen[0].head
        assert head[0] == "POST /sdapi/v1/txt2img HTTP/1.1"
        assert f"Host: {backend.url.removeprefix('http://')}" in head
        assert "Content-Length: 18" in head and "Accept-Encoding: identity" in head
        assert [s.body for s in backend.seen] == [b'{"prompt":"a cat"}', b'{"prompt":"a dog"}']
        assert backend.connections == 1 and [s.number for s in backend.seen] == [0, 1]

    backend = Backend(answer)
    run(main())


def test_chunked_answer_is_joined_and_the_connection_kept() -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b'{"images":', b'["abc"', b"]}"):
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
        w.write(b"0\r\n\r\n")
        return True

    async def main() -> None:
        pool = Upstream()
        async with backend:
            assert (await fetch(pool, backend.url))[2] == b'{"images":["abc"]}'
            assert (await fetch(pool, backend.url))[2] == b'{"images":["abc"]}'
        assert backend.connections == 1

    backend = Backend(answer)
    run(main())


def test_answer_delimited_by_close_is_whole_and_the_connection_not_reused() -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000)
        return False

    async def main() -> None:
        pool = Upstream()
        async with backend:
            assert (await fetch(pool, backend.url))[2] == b"x" * 5000
            assert (await fetch(pool, backend.url))[2] == b"x" * 5000
        assert backend.connections == 2

    backend = Backend(answer)
    run(main())


def test_a_kept_connection_the_backend_dropped_is_replaced_without_an_error() -> None:
    """The race the pool cannot see coming: the backend closes an idle connection just as a request is
    sent on it. The request never reached the backend, so it goes again on a new connection."""

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if seen.number > 0:
            return False  # close without answering, as an idle timeout crossing the request would
        w.write(plain(b"{}"))
        return True

    async def main() -> None:
        pool = Upstream()
        async with backend:
            assert (await fetch(pool, backend.url))[0] == 200
            assert (await fetch(pool, backend.url))[0] == 200
        assert backend.connections == 2
        assert [(s.connection, s.number) for s in backend.seen] == [(0, 0), (0, 1), (1, 0)]

    backend = Backend(answer)
    run(main())


def test_connections_idle_longer_than_the_limit_are_not_reused() -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(plain(b"{}"))
        return True

    async def main() -> None:
        pool = Upstream(idle_seconds=0.05)
        async with backend:
            await fetch(pool, backend.url)
            await asyncio.sleep(0.1)
            await fetch(pool, backend.url)
            await asyncio.sleep(0.02)
        assert backend.connections == 2 and backend.eofs == 1  # the stale one was closed by the pool

    backend = Backend(answer)
    run(main())


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (b"", "closed the connection before answering"),  # a new connection closed without a byte: no retry
        (plain(b"0123456789")[:-5], "closed the connection early"),  # cut off in the body
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "closed the connection early"),
        (b"SMTP ready\r\n\r\n", "unparsable answer"),
    ],
)
def test_broken_answers_raise_upstream_error(sent: bytes, message: str) -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(sent)
        return False

    async def main() -> None:
        pool = Upstream()
        async with backend:
            with pytest.raises(UpstreamError, match=message):
                await fetch(pool, backend.url)
        assert len(backend.seen) == 1  # not retried: the backend saw it

    backend = Backend(answer)
    run(main())


def test_refused_connection_raises_upstream_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    with pytest.raises(UpstreamError, match="cannot connect"):
        run(fetch(Upstream(), f"http://127.0.0.1:{port}"))


@pytest.mark.parametrize("stall_after", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"])
def test_timeout_covers_waiting_for_headers_and_for_the_body(stall_after: bytes) -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(stall_after)
        await w.drain()
        await seen.reader.read()  # returns when the client closes the connection
        backend.eofs += 1
        return False

    async def main() -> None:
        pool = Upstream()
        async with backend:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await fetch(pool, backend.url, seconds=0.3)
            assert 0.25 < loop.time() - started < 3
            for _ in range(50):  # the timed-out connection is closed, not returned to the pool
                if backend.eofs:
                    break
                await asyncio.sleep(0.02)
            assert backend.eofs == 1 and not pool._idle.get(backend.url)

    backend = Backend(answer)
    run(main())


def test_a_large_answer_streams_with_bounded_buffering(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow reader pauses the backend instead of buffering everything (the limit is lowered to see it)."""
    monkeypatch.setattr(up, "PAUSE_ABOVE", 256 * 1024)
    payload = bytes(range(256)) * 4096 * 8  # 8 MiB

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(plain(payload, extra=""))
        return True

    async def main() -> None:
        pool = Upstream()
        async with backend:
            async with pool.request(backend.url, "POST", "/x", b"{}", timeout=20) as response:
                assert response.content_length == len(payload)
                received, most = [], 0
                async for chunk in response.iter_chunks():
                    received.append(chunk)
                    most = max(most, response._buffered)
                    await asyncio.sleep(0.001)
            assert b"".join(received) == payload
            # Paused at the limit; what was already in flight (socket buffers) may still arrive after it.
            assert most < 256 * 1024 + 4 * 1024 * 1024 and len(received) > 8
            assert (await fetch(pool, backend.url))[2] == payload  # the connection was kept
        assert backend.connections == 1

    backend = Backend(answer)
    run(main())


def test_an_answer_left_unread_closes_its_connection() -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        whole = plain(b"y" * 1000)
        if seen.connection == 0:  # the body comes after the caller has left
            w.write(whole[:-1000])
            await w.drain()
            await asyncio.sleep(0.2)
        w.write(whole[-1000:] if seen.connection == 0 else whole)
        return True

    async def main() -> None:
        pool = Upstream()
        async with backend:
            async with pool.request(backend.url, "POST", "/x", b"{}") as response:
                assert response.status == 200  # body not read
            assert (await fetch(pool, backend.url))[2] == b"y" * 1000
        assert backend.connections == 2

    backend = Backend(answer)
    run(main())


def self_signed(tmp_path: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context that trusts only it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


def test_https_backends_are_verified(tmp_path: Any) -> None:
    server_tls, client_tls = self_signed(tmp_path)

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(plain(b'{"tls":true}'))
        return True

    async def main() -> None:
        async with backend:
            assert (await fetch(Upstream(tls=client_tls), backend.url))[2] == b'{"tls":true}'
            with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(Upstream(), backend.url)  # the system's CAs do not know this certificate

    backend = Backend(answer, tls=server_tls)
    run(main())
