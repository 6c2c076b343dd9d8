"""A TCP proxy that loses messages on purpose: the faults a network really has, in front of a real server.

While armed for a marker (bytes that only the request of interest contains, e.g. a key name), the next request
chunk that contains it is either forwarded and its reply thrown away (``lose="reply"``: the server ran the command,
the client sees its connection close) or not forwarded at all (``lose="request"``: the command never ran). Either
way the client's connection is closed, which is what a client sees when a reply is lost. One request per chunk
and one reply per chunk are assumed, which holds for one command at a time on a connection (no pipelining).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Literal

Lose = Literal["reply", "request"]


@dataclass
class FaultyProxy:
    upstream_host: str
    upstream_port: int
    marker: bytes = b""
    remaining: int = 0
    """How many more matching requests lose their message."""
    lose: Lose = "reply"
    lost: int = 0
    """How many messages were lost so far."""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def arm(self, marker: bytes, times: int = 1, lose: Lose = "reply") -> None:
        self.marker, self.remaining, self.lose = marker, times, lose

    def disarm(self) -> None:
        self.remaining = 0

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_r, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        drop_reply = asyncio.Event()

        async def upstream() -> None:  # client -> server
            while chunk := await client_r.read(65536):
                if self.remaining > 0 and self.marker in chunk:
                    self.remaining -= 1
                    if self.lose == "request":
                        self.lost += 1
                        return
                    drop_reply.set()
                up_w.write(chunk)
                await up_w.drain()

        async def downstream() -> None:  # server -> client
            while chunk := await up_r.read(65536):
                if drop_reply.is_set():
                    self.lost += 1
                    return
                client_w.write(chunk)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a connection task that ends cancelled)
            pass
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, up_w):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._tasks.discard(task)
