"""The engine behind the server: loaded in the background, requests admitted up to a bound.

The server starts listening at once and loads the model on a thread, so ``/health``
answers during a load that can take minutes (a download, a large file) and model
routes say 503 with ``Retry-After`` until it is done.

Admission is counted in sequences (a request with ``n=4`` counts 4): at most
``max_num_seqs`` run, at most ``max_queue`` more wait; a request beyond that gets
503 with ``Retry-After`` instead of waiting without bound.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Callable

from cholla.engine.async_engine import AsyncLLMEngine
from cholla.engine.engine import LLMEngine
from cholla.serve.errors import APIError

log = logging.getLogger("cholla")

RETRY_AFTER_LOADING_S = 5
RETRY_AFTER_FULL_S = 1


class HostState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Admission:
    """One admitted request's share of the bound; ``release()`` may be called more than once."""

    def __init__(self, host: EngineHost, num_seqs: int):
        self._host, self._num_seqs = host, num_seqs

    def release(self) -> None:
        if self._num_seqs:
            self._host._release(self._num_seqs)
            self._num_seqs = 0


class EngineHost:
    def __init__(
        self,
        load: Callable[[], LLMEngine],
        max_queue: int,
        on_load_error: Callable[[BaseException], None] | None = None,
    ):
        self._load = load
        self.max_queue = max_queue
        self._on_load_error = on_load_error
        self.state = HostState.LOADING
        self.load_error: str | None = None
        self.engine: AsyncLLMEngine | None = None
        self.max_in_flight = 0
        self.num_in_flight = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._load_in_background, name="cholla-load", daemon=True).start()

    def _load_in_background(self) -> None:
        start = time.monotonic()
        log.info("loading the model; /health answers now, /ready once it is loaded")
        try:
            engine = self._load()
        except BaseException as e:  # reported on /ready and to the CLI, never lost in a thread
            self.load_error = str(e) or type(e).__name__
            self.state = HostState.FAILED
            log.error("loading the model failed: %s", self.load_error)
            if self._on_load_error is not None:
                self._on_load_error(e)
            return
        self.max_in_flight = engine.config.max_num_seqs + self.max_queue
        self.engine = AsyncLLMEngine(engine)
        self.state = HostState.READY
        log.info(
            "model loaded in %.1f s: %s, context %d tokens; ready",
            time.monotonic() - start, engine.loaded.path.name, engine.max_model_len,
        )

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def require(self) -> AsyncLLMEngine:
        """The engine, or a 503 that tells the client when to come back."""
        if self.engine is not None:
            return self.engine
        if self.state is HostState.FAILED:
            raise APIError(503, f"the model failed to load: {self.load_error}; fix it and restart the server")
        raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})

    def admit(self, num_seqs: int) -> Admission:
        with self._lock:
            if self.num_in_flight + num_seqs > self.max_in_flight:
                raise APIError(
                    503,
                    f"the server is at capacity ({self.num_in_flight} sequences running or queued, "
                    f"at most {self.max_in_flight}); retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_FULL_S)},
                )
            self.num_in_flight += num_seqs
        return Admission(self, num_seqs)

    def _release(self, num_seqs: int) -> None:
        with self._lock:
            self.num_in_flight -= num_seqs
