"""``cholla chat``: a conversation in the terminal, on the engine directly (no server).

Each turn renders the whole conversation through the chat template and sends it
as a new request. The earlier turns render to the same token ids every time, so
the engine's prefix cache serves them and only the new message is computed.

Ctrl+C while an answer streams stops it between two engine steps; the partial
answer stays in the history (it is what the user saw), unless nothing was
generated yet, in which case the whole turn is dropped. Ctrl+C at an empty
prompt, Ctrl+D or ``/quit`` leave.
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

from cholla.errors import ChollaError, ContextLengthError
from cholla.llm import LLM, Message
from cholla.sampling.params import SamplingParams

PROMPT = ">>> "
HELP = """\
Commands:
  /help          this list
  /clear         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start a new conversation; /system alone shows it
  /stats         speed and token counts of the last answer
  /model         the model's path, architecture and context
  /quit, /exit   leave (also Ctrl+D, or Ctrl+C at an empty prompt)
Ctrl+C while an answer streams stops it; the partial answer stays in the conversation."""


@dataclass
class TurnStats:
    """What one answer cost: the numbers ``/stats`` shows."""

    prompt_tokens: int
    cached_prompt_tokens: int  # served by the prefix cache, not recomputed
    completion_tokens: int
    prefill_s: float  # request sent → first token
    decode_s: float  # first token → last token
    finish_reason: str
    # Speculative decoding during this answer (an engine with --speculative-method): drafts proposed,
    # drafts accepted, verification steps.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verifications: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s > 0 else None

    @property
    def context_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatSession:
    """A conversation with one model: the messages so far, the system prompt, the last answer's stats."""

    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None):
        self.llm, self.params, self.system = llm, params, system
        self.history: list[Message] = []
        self.last_stats: TurnStats | None = None
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def clear(self) -> None:
        self.history.clear()

    def set_system(self, text: str) -> None:
        """A new system prompt starts a new conversation: the old turns were answered under another one."""
        self.system = text
        self.clear()

    def reply(
        self, text: str, on_text: Callable[[str], None], stop_requested: Callable[[], bool] = lambda: False
    ) -> TurnStats:
        """Answer ``text`` given the conversation so far, handing each new piece of text to ``on_text``.

        ``stop_requested`` is polled between engine steps; when it turns true the request is
        aborted and the partial answer kept. Raises ``ContextLengthError`` (history unchanged)
        when the conversation no longer fits the context.
        """
        engine = self.llm.engine
        messages = self.messages() + [{"role": "user", "content": text}]
        prompt_ids = self.llm.encode_messages(messages)
        request_id = f"chat-{next(self._ids)}"
        start, before = time.perf_counter(), engine.stats()
        engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, self.params)
        first = last = None
        answer, num_tokens, cached = "", 0, 0
        finish_reason: str | None = None
        try:
            while finish_reason is None and not stop_requested():
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    last = time.perf_counter()
                    first = first or last
                    completion = out.outputs[0]
                    on_text(completion.text[len(answer):])
                    answer, num_tokens = completion.text, len(completion.token_ids)
                    cached = out.metrics.num_cached_prompt_tokens if out.metrics else 0
                    finish_reason = completion.finish_reason
        finally:
            engine.abort(request_id)  # no-op once finished; frees the blocks when stopped early
        if num_tokens:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.last_stats = TurnStats(
            prompt_tokens=len(prompt_ids),
            cached_prompt_tokens=cached,
            completion_tokens=num_tokens,
            prefill_s=(first - start) if first else time.perf_counter() - start,
            decode_s=(last - first) if first else 0.0,
            finish_reason=finish_reason or "abort",
        )
        after = engine.stats()
        self.last_stats.draft_tokens = after.spec_draft_tokens - before.spec_draft_tokens
        self.last_stats.accepted_tokens = after.spec_accepted_tokens - before.spec_accepted_tokens
        self.last_stats.verifications = after.spec_verifications - before.spec_verifications
        return self.last_stats


@contextmanager
def _ctrl_c_as_flag() -> Iterator[threading.Event]:
    """While an answer streams, Ctrl+C sets a flag instead of raising, so no engine step is cut in half."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _use_readline() -> None:
    """Line editing and history for ``input()``, where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on)
    except ImportError:
        pass


def _typed_so_far() -> str:
    """The text on the prompt line when Ctrl+C came, so Ctrl+C on a non-empty line only clears it."""
    readline = sys.modules.get("readline")
    return readline.get_line_buffer() if readline else ""


class ChatLoop:
    """Reads lines, runs commands, streams answers. ``read_line`` is ``input`` in a terminal, anything in tests."""

    def __init__(self, session: ChatSession, read_line: Callable[[str], str] = input, out: TextIO = sys.stdout):
        self.session, self.read_line, self.out = session, read_line, out
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self._help, "/clear": self._clear, "/system": self._system,
            "/stats": self._stats, "/model": self._model, "/quit": self._quit, "/exit": self._quit,
        }

    def run(self) -> int:
        self._print(f"Chatting with {self.session.llm.engine.loaded.path.name}. /help for commands, /quit to leave.")
        while True:
            try:
                line = self.read_line(PROMPT)
            except EOFError:
                self._print("")
                return 0
            except KeyboardInterrupt:
                self._print("")
                if _typed_so_far().strip():
                    continue  # Ctrl+C on a half-typed line only clears it
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                name, _, argument = line.partition(" ")
                command = self.commands.get(name)
                if command is None:
                    self._print(f"unknown command {name}; /help lists the commands")
                elif not command(argument.strip()):
                    return 0
                continue
            self._answer(line)

    def _answer(self, text: str) -> None:
        session = self.session
        with _ctrl_c_as_flag() as stop:
            try:
                stats = session.reply(text, self._write, stop.is_set)
            except ContextLengthError:
                self._print(
                    f"The conversation no longer fits the context ({session.max_model_len} tokens): "
                    "/clear starts a new one (or restart with a larger --max-model-len)."
                )
                return
            except ChollaError as e:
                self._print(f"error: {e}")
                return
        self._print("")
        if stats.finish_reason == "abort":
            self._print("[stopped]")
        elif stats.finish_reason == "length" and stats.context_used >= session.max_model_len:
            self._print(f"[the context is full ({session.max_model_len} tokens): /clear starts a new conversation]")

    # Each command returns False to end the loop.

    def _help(self, _: str) -> bool:
        self._print(HELP)
        return True

    def _clear(self, _: str) -> bool:
        self.session.clear()
        self._print("Conversation cleared.")
        return True

    def _system(self, text: str) -> bool:
        if not text:
            self._print(f"System prompt: {self.session.system}" if self.session.system else "No system prompt.")
        else:
            self.session.set_system(text)
            self._print("System prompt set; new conversation.")
        return True

    def _stats(self, _: str) -> bool:
        stats, max_len = self.session.last_stats, self.session.max_model_len
        if stats is None:
            self._print("No answer yet.")
            return True
        rate = stats.decode_tokens_per_s
        prefill_rate = (stats.prompt_tokens - stats.cached_prompt_tokens) / stats.prefill_s if stats.prefill_s else 0.0
        self._print(
            f"prompt: {stats.prompt_tokens} tokens, {stats.cached_prompt_tokens} from the prefix cache, "
            f"{stats.prompt_tokens - stats.cached_prompt_tokens} computed in {stats.prefill_s:.2f} s ({prefill_rate:.1f} tokens/s)\n"
            f"answer: {stats.completion_tokens} tokens, {f'{rate:.1f} tokens/s' if rate else 'no decode rate'}, "
            f"finish: {stats.finish_reason}\n"
            f"context: {stats.context_used} / {max_len} tokens ({100 * stats.context_used / max_len:.0f}%)"
        )
        if self.session.llm.engine.speculator is not None:
            rate = stats.accepted_tokens / stats.draft_tokens if stats.draft_tokens else 0.0
            length = 1 + stats.accepted_tokens / stats.verifications if stats.verifications else 0.0
            self._print(f"speculative: {stats.draft_tokens} drafts proposed, {stats.accepted_tokens} accepted "
                        f"({rate:.0%}), {length:.2f} tokens per verification step ({stats.verifications} steps)")
        return True

    def _model(self, _: str) -> bool:
        engine = self.session.llm.engine
        config = engine.model_config
        self._print(
            f"path: {engine.loaded.path}\narchitecture: {config.architecture}, {config.num_layers} layers, "
            f"vocabulary {config.vocab_size}\ncontext: {engine.max_model_len} tokens "
            f"(the model was trained for {config.max_position_embeddings})"
        )
        return True

    def _quit(self, _: str) -> bool:
        return False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _print(self, text: str) -> None:
        self._write(text + "\n")


def run_chat(llm: LLM, params: SamplingParams, system: str | None = None) -> int:
    """The terminal entry point: readline on, stdin and stdout."""
    _use_readline()
    return ChatLoop(ChatSession(llm, params, system)).run()
