"""A TCP relay that emulates a network link: one-way delay and a rate limit in each direction, and a
count of the bytes that crossed it. Runs on its own thread with its own event loop.

Each direction is a FIFO: a chunk read at ``t`` leaves the link's queue at
``free = max(free, t) + len / rate`` and is written at ``free + delay`` (reading never waits for
writing, so the link pipelines like a real one: delay once, then the rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Link:
    delay_s: float
    rate_bytes_s: float
    down_bytes: int = 0  # cloud -> device
    up_bytes: int = 0  # device -> cloud
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.down_bytes, self.up_bytes

    def add(self, down: bool, n: int) -> None:
        with self._lock:
            if down:
                self.down_bytes += n
            else:
                self.up_bytes += n


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, down: bool) -> None:
    queue: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue()

    async def read() -> None:
        free = 0.0
        try:
            while chunk := await reader.read(1 << 16):
                now = time.monotonic()
                free = max(free, now) + len(chunk) / link.rate_bytes_s
                link.add(down, len(chunk))
                await queue.put((chunk, free + link.delay_s))
        except ConnectionError:
            pass
        await queue.put(None)

    async def write() -> None:
        try:
            while (item := await queue.get()) is not None:
                chunk, at = item
                await asyncio.sleep(max(at - time.monotonic(), 0.0))
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    await asyncio.gather(read(), write())


@contextlib.contextmanager
def relay(target_port: int, link: Link) -> Iterator[int]:
    """Relay 127.0.0.1:<yielded port> to 127.0.0.1:``target_port`` through ``link``."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, link, False), _pump(server_r, client_w, link, True))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await server.serve_forever()

    def run() -> None:
        with contextlib.suppress(RuntimeError):  # stopped at the end, with the server still serving
            loop.run_until_complete(main())

    thread = threading.Thread(target=run, name="relay", daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
