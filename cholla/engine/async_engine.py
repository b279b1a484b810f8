"""The engine for servers: requests arrive from many coroutines, one thread steps.

All engine state is touched by a single background thread. Coroutines hand it
work through a command queue and receive outputs on per-request asyncio
queues, so the event loop never blocks on a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from cholla.engine.engine import LLMEngine
from cholla.engine.outputs import RequestOutput
from cholla.sampling.params import SamplingParams

log = logging.getLogger("cholla")

SHUTDOWN_TIMEOUT_S = 120  # longer than any one step, even a long prefill on a busy machine


class EngineDeadError(RuntimeError):
    """The background loop failed; the request cannot complete."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="cholla-engine", daemon=True)
        self._thread.start()

    # -- called from coroutines ----------------------------------------------

    async def generate(
        self, prompt: str | list[int] | dict, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request (all ``params.n`` sequences) until each has finished.

        Validation errors (prompt too long, bad ids) raise here, before anything is queued.
        Leaving the iteration early (a client hung up) aborts the request and frees its blocks.
        """
        if self._stopped:
            raise EngineDeadError("the engine has shut down")
        text, token_ids = self.engine.tokenize_prompt(prompt)
        self.engine.check_prompt(token_ids, params)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        submitted = {"prompt": text, "prompt_token_ids": token_ids}
        self._submit(lambda: self._add(request_id, submitted, params))
        remaining = params.n
        try:
            while remaining:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    remaining -= 1
                yield out
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id))

    def shutdown(self) -> None:
        """Stop after the current step and end every request in flight.

        Waits for the step to finish: a process that exits while the engine
        thread is inside a torch kernel aborts instead of exiting cleanly.
        """
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=SHUTDOWN_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within %d s", SHUTDOWN_TIMEOUT_S)
            return
        # Every waiting stream ends, including one whose request was still in the command queue.
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError("the engine is shutting down"))
        for request_id in list(self.engine.states):
            self.engine.abort(request_id)
        self.engine.close()  # the disk tier's last writes, so a restart finds them

    # -- the background thread -----------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _add(self, request_id: str, prompt: dict, params: SamplingParams) -> None:
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as e:  # e.g. an id already in use: only this request fails
            self._deliver(request_id, e)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id) or self._streams.get(request_id.rsplit("#", 1)[0])
        if stream is not None:
            loop, outputs = stream
            if not loop.is_closed():  # the consumer's loop may be gone at shutdown
                loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopped:
            while True:
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                log.exception("engine step failed; aborting the requests in flight")
                for request_id in list(self.engine.states):
                    self._deliver(request_id, EngineDeadError(f"engine step failed: {e}"))
                    self.engine.abort(request_id)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
