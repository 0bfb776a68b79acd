"""Forwards TCP ports from this machine's 127.0.0.1 into a network namespace (the dev cluster's).

    python portforward.py --netns /proc/PID/ns/net 16442=127.0.0.1:16442 18080=127.0.0.1:18080

Each LISTEN_PORT=HOST:PORT listens on 127.0.0.1:LISTEN_PORT here and connects, for every client, to
HOST:PORT inside the namespace. The listening sockets are made first, in this namespace; then the
process joins the target namespace (setns), so every socket it makes afterwards (the connections to
the targets) lives there. One process, no helper inside, and nothing listens on anything but loopback.
Prints FORWARDING once all ports listen. Needs CAP_SYS_ADMIN (root), like the namespace itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

CLONE_NEWNET = 0x40000000


def join_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def handler(host: str, port: int) -> Handler:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()  # nothing listens there (yet): the client sees a closed connection
            return
        await asyncio.gather(pipe(client_r, target_w), pipe(target_r, client_w))

    return handle


async def serve(listeners: list[tuple[socket.socket, str, int]]) -> None:
    servers = [await asyncio.start_server(handler(host, port), sock=sock) for sock, host, port in listeners]
    print("FORWARDING", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--netns", required=True, help="the namespace, e.g. /proc/PID/ns/net")
    parser.add_argument("mappings", nargs="+", metavar="LISTEN_PORT=HOST:PORT")
    args = parser.parse_args(argv)
    listeners = []
    for mapping in args.mappings:
        listen, _, target = mapping.partition("=")
        host, _, port = target.rpartition(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", int(listen)))
        except OSError as e:
            print(f"portforward: cannot listen on 127.0.0.1:{listen}: {e.strerror}", file=sys.stderr)
            return 1
        sock.listen(128)
        listeners.append((sock, host, int(port)))
    join_netns(args.netns)
    asyncio.run(serve(listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
