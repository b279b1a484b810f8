"""``cholla chat`` on the real default model: history, the prefix cache across turns,
the commands, stopping an answer, a full context, and one run in a real terminal (tmux)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from cholla import LLM, SamplingParams
from cholla.chat import PROMPT, ChatLoop, ChatSession

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
SHORT = SamplingParams(temperature=0.0, max_tokens=2)  # where only the history matters
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(smollm2_path, max_model_len=512)


def _lines(*lines: str) -> Callable[[str], str]:
    """A stand-in for ``input``: hands out ``lines``, then EOF (Ctrl+D)."""
    remaining = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read_line


def _run(session: ChatSession, *lines: str) -> str:
    out = io.StringIO()
    assert ChatLoop(session, _lines(*lines), out).run() == 0
    return out.getvalue()


def _greedy_reply(llm: LLM, messages: list[dict]) -> str:
    return llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0].text


def test_stats_show_speculation(smollm2_path):
    """With --speculative-method, /stats counts this answer's drafts, as the engine does."""
    llm = LLM(smollm2_path, max_model_len=512, speculative_method="ngram", num_speculative_tokens=4)
    session = ChatSession(llm, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    output = _run(session, "Repeat exactly: one two three four five six seven eight nine ten", "/stats")
    stats, engine = session.last_stats, llm.engine.stats()
    assert 0 < stats.accepted_tokens <= stats.draft_tokens == engine.spec_draft_tokens
    assert stats.verifications == engine.spec_verifications
    assert (f"speculative: {stats.draft_tokens} drafts proposed, {stats.accepted_tokens} accepted "
            f"({stats.accepted_tokens / stats.draft_tokens:.0%}), {engine.spec_mean_accepted_length:.2f} tokens per "
            f"verification step ({stats.verifications} steps)") in output


def test_second_turn_reuses_the_cached_prefix_and_matches_llm_chat(llm):
    session = ChatSession(llm, GREEDY)
    output = _run(session, "/stats", "What is the capital of France?", "And of Italy?", "/stats")
    first_prompt_tokens = len(llm.encode_messages(session.history[:1]))
    answers = [m["content"] for m in session.history if m["role"] == "assistant"]
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert _greedy_reply(llm, session.history[:3]) == answers[1] != ""
    # Turn 1's prompt renders to the same ids again: its whole blocks come from the cache.
    block_size = llm.engine.block_manager.block_size
    stats = session.last_stats
    assert stats.cached_prompt_tokens >= (first_prompt_tokens // block_size) * block_size > 0
    assert stats.prompt_tokens == len(llm.encode_messages(session.history[:3]))
    assert "No answer yet." in output
    assert f"prompt: {stats.prompt_tokens} tokens, {stats.cached_prompt_tokens} from the prefix cache" in output
    assert re.search(r"answer: \d+ tokens, [\d.]+ tokens/s", output)
    assert f"context: {stats.context_used} / 512 tokens" in output


def test_clear_forgets_the_conversation(llm):
    session = ChatSession(llm, SHORT)
    output = _run(session, "My name is Ada.", "/clear", "Hello!")
    assert "Conversation cleared." in output
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Hello!"]
    assert session.last_stats.prompt_tokens == len(llm.encode_messages([{"role": "user", "content": "Hello!"}]))


def test_system_sets_the_prompt_and_starts_over(llm):
    session = ChatSession(llm, SHORT)
    output = _run(session, "/system", "Hi!", "/system You answer in French.", "/system", "Bonjour !")
    assert "No system prompt." in output
    assert "System prompt: You answer in French." in output
    messages = session.messages()
    assert messages[0] == {"role": "system", "content": "You answer in French."}
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Bonjour !"]
    assert session.last_stats.prompt_tokens == len(llm.encode_messages(messages[:2]))


def test_help_unknown_command_and_quit(llm):
    session = ChatSession(llm, GREEDY)
    output = _run(session, "/help", "/nope", "/model", "/quit", "never read")
    assert "/clear" in output and "/system TEXT" in output and "/stats" in output
    assert "unknown command /nope; /help lists the commands" in output
    assert "architecture: llama" in output and "context: 512 tokens" in output
    assert session.history == []  # "never read" was never answered


def test_stopping_an_answer_keeps_what_was_shown_and_frees_its_blocks(llm):
    session = ChatSession(llm, SamplingParams(temperature=0.0, max_tokens=20))
    shown: list[str] = []
    stats = session.reply("Tell me a long story.", shown.append, stop_requested=lambda: len(shown) >= 3)
    assert stats.finish_reason == "abort" and stats.completion_tokens == 3
    assert session.history[-1] == {"role": "assistant", "content": "".join(shown)}
    manager = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert all(count == 0 for count in manager.allocator.ref_counts)
    # Stopped before the first token: the whole turn is dropped, not left half-answered.
    session.reply("Another one.", shown.append, stop_requested=lambda: True)
    assert len(session.history) == 2


def test_a_full_context_says_what_to_do(llm):
    session = ChatSession(llm, SHORT)
    long_turn = "Please repeat this sentence back to me, word for word. " * 25
    session.history = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn}]
    output = _run(session, "And again?")
    assert "no longer fits the context (512 tokens): /clear starts a new one" in output
    assert "Traceback" not in output
    assert len(session.history) == 2  # the turn that did not fit left no trace


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def _wait_for(session: str, done: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pane = _pane(session)
        if done(pane):
            return pane
        time.sleep(0.3)
    raise AssertionError(f"timed out; the terminal shows:\n{pane}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_in_a_real_terminal(smollm2_path):
    """An answer, then Ctrl+C in the middle of a long one (the real SIGINT path), then /quit."""
    session = f"cholla-chat-{uuid.uuid4().hex[:8]}"
    # -n 600: the story must still be streaming when Ctrl+C arrives (60 tokens took 0.3 s once decode got fast).
    command = f"{sys.executable} -m cholla chat smollm2 -t 0 -n 600 --max-model-len 1024; echo EXIT=$?; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", "-c", str(REPO), command], check=True)

    def send(*keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)

    def at_prompt(count: int) -> Callable[[str], bool]:
        return lambda pane: pane.count(PROMPT.strip()) >= count and pane.rstrip().endswith(">>>")

    try:
        _wait_for(session, at_prompt(1), 60)
        send("What is the capital of France?", "Enter")  # answered in a few tokens, then end of turn
        pane = _wait_for(session, at_prompt(2), 60)
        assert "Paris" in pane.split("What is the capital of France?", 1)[1]

        story = "Write a long story about a dragon."
        send(story, "Enter")
        _wait_for(session, lambda pane: story in pane and pane.split(story, 1)[1].strip(), 60)  # the answer began
        send("C-c")
        pane = _wait_for(session, at_prompt(3), 30)
        assert "[stopped]" in pane and "Traceback" not in pane

        send("/quit", "Enter")
        _wait_for(session, lambda pane: "EXIT=0" in pane, 20)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
