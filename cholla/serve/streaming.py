"""Engine streams over HTTP: server-sent events, merged prompts, and hang-ups that abort.

A request's engine stream aborts (and frees its KV blocks) when it is closed before
the end. Everything here makes sure it is closed: the SSE response closes its body
when the client goes away, and a non-streaming request watches for the disconnect
while it waits.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cholla.engine.outputs import RequestOutput

T = TypeVar("T")
_DONE = object()


def sse(data: dict | str, event: str | None = None) -> str:
    """One server-sent event; ``data`` is a JSON object or a literal such as ``[DONE]``."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` whose body is closed, and ``on_close`` called, however it ends.

    Starlette stops iterating the body when the client disconnects but leaves the
    generator open; closing it here runs its ``finally`` blocks (the engine abort) now.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket closed under a send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self._on_close()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index; closing this closes them all."""
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for item in stream:
                yield 0, item
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, _DONE))
        except Exception as e:
            await queue.put((index, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def finished_only(stream: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The last output of each sequence (it holds the whole completion): what a non-streaming reply needs."""
    try:
        async for index, out in stream:
            if out.finished:
                yield index, out
    finally:
        await stream.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, stream: AsyncIterator[T]) -> list[T] | None:
    """Every item of ``stream``, or None (and the stream closed, so the engine aborts) if the client hangs up."""

    async def gather() -> list[T]:
        try:
            return [item async for item in stream]
        finally:
            await stream.aclose()

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        return None
    return work.result()

