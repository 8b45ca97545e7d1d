"""A plain TCP relay on a loopback port in front of the API, whose connections a test can cut:
the browser's view of a network drop (its open requests, an event stream among them, end at
once), and of a network that stays down for a while (new connections wait, unrelayed, until
``resume``)."""

from __future__ import annotations

import asyncio

from tests.fixtures.threads import LoopThread


class CutProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.thread = LoopThread("cut-proxy")
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CutProxy:
        async def open_server() -> asyncio.Server:
            self._open = asyncio.Event()
            self._open.set()
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self.server = self.thread.call(open_server())
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._open is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        up_writer: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # while the "network" is down, a new connection waits here
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except ConnectionError:
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writer.close()
            if up_writer is not None:
                up_writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    def cut(self) -> None:
        """Close every relayed connection now; new ones wait until :meth:`resume`."""

        async def cut() -> None:
            assert self._open is not None
            self._open.clear()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self.thread.call(cut())

    def resume(self) -> None:
        async def resume() -> None:
            assert self._open is not None
            self._open.set()

        self.thread.call(resume())

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.server.wait_closed()

        if self.server is not None:
            self.thread.call(close())
        self.thread.stop()
