"""The web chat page at ``/`` of ``cholla serve``, driven in headless Chromium over the DevTools protocol.

The page must stream the same greedy answer the API gives for the same conversation,
send the whole conversation each turn, use the API key, show errors and stop on demand.
A screenshot of the finished conversation lands in ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.serve import ServerSettings, create_app

websockets_client = pytest.importorskip("websockets.sync.client", reason="the websockets package is not installed")

CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")

API_KEY = "test-key"
MAX_TOKENS = 6
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """``cholla serve``'s app on a thread: where to reach it, and the engine behind it."""

    url: str
    app: FastAPI

    @property
    def engine(self) -> LLMEngine:
        return self.app.state.ctx.host.engine.engine


@pytest.fixture(scope="module")
def server(smollm2_path):
    # float32: the page's answer is compared with the API's for the same conversation, which hits the
    # prefix cache and so runs in a step of another size; only fp32 is batch-invariant, and this prompt's
    # top two first tokens are 0.08 apart.
    config = EngineConfig(max_model_len=512, kv_cache_memory=64 * 2**20, dtype="float32")
    app = create_app(ServerSettings(["smollm2"], api_key=API_KEY), lambda: LLMEngine(smollm2_path, config))
    port = _free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not uvicorn_server.started or httpx.get(f"{url}/ready", headers=_auth()).status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.1)
    yield Server(url, app)
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


class Browser:
    """Headless Chromium and one page, spoken to through the DevTools protocol's JSON messages."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--window-size=1000,760", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.process.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.connection = ExitStack()
        self.ws = self.connection.enter_context(websockets_client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        self.ids = itertools.count(1)
        self.errors: list[str] = []  # uncaught exceptions and console errors of the page
        self.call("Runtime.enable")

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]
            if message.get("method") == "Runtime.exceptionThrown":
                self.errors.append(message["params"]["exceptionDetails"]["text"])
            elif message.get("method") == "Runtime.consoleAPICalled" and message["params"]["type"] == "error":
                self.errors.append(str(message["params"]["args"]))

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value

    def set_field(self, element_id: str, value: str) -> None:
        """Fill a field as a user would, so the page's input and change listeners run."""
        self.eval(f"""{{ const f = document.getElementById({json.dumps(element_id)}); f.value = {json.dumps(value)};
                      f.dispatchEvent(new Event('input')); f.dispatchEvent(new Event('change')); }}""")

    def type_and_send(self, text: str) -> None:
        self.eval("document.getElementById('message').focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.connection.close()
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def page(server, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=server.url)
        browser.wait_for("document.readyState === 'complete' && document.body.dataset.busy === 'false'", 30)
        yield browser
    finally:
        browser.close()


LAST_ANSWER = "[...document.querySelectorAll('.msg.assistant')].at(-1)"


def _answer_when_done(page: Browser) -> dict:
    page.wait_for(f"document.body.dataset.busy === 'false' && {LAST_ANSWER}.querySelector('.stats').textContent", 120)
    return page.eval(f"""({{ text: {LAST_ANSWER}.querySelector('.content').textContent,
                           stats: {LAST_ANSWER}.querySelector('.stats').textContent,
                           error: {LAST_ANSWER}.classList.contains('error') }})""")


def _api_answer(url: str, messages: list[dict]) -> dict:
    """The API's own non-streamed greedy answer: its ``message.content`` and ``usage``."""
    body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=120)
    response.raise_for_status()
    body = response.json()
    return {"text": body["choices"][0]["message"]["content"], "usage": body["usage"]}


def test_page_streams_the_greedy_answer_and_keeps_the_conversation(page, server, tmp_path):
    assert page.wait_for("document.getElementById('model').textContent.includes('401')", 15)  # no key yet

    page.set_field("temperature", "0")
    page.set_field("max-tokens", str(MAX_TOKENS))
    page.set_field("api-key", "wrong")
    page.type_and_send("Hello?")
    refused = _answer_when_done(page)
    assert refused["error"] and refused["text"].startswith("Error 401: missing or wrong API key")

    page.set_field("api-key", API_KEY)
    assert page.wait_for("document.getElementById('model').textContent.includes('smollm2 · context 512')", 15)
    assert page.eval("localStorage.getItem('cholla.api-key')") == API_KEY

    page.type_and_send("What is the capital of France?")
    first = _answer_when_done(page)
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    assert not first["error"]
    reference = _api_answer(server.url, conversation)
    assert first["text"] == reference["text"] != ""
    usage = reference["usage"]
    assert first["stats"].startswith(f"{usage['prompt_tokens']} prompt tokens · {usage['completion_tokens']} tokens · ")

    page.type_and_send("And of Italy?")
    second = _answer_when_done(page)
    conversation += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And of Italy?"}]
    assert second["text"] == _api_answer(server.url, conversation)["text"] != ""  # the page sent the whole conversation
    assert "tokens/s" in second["stats"]

    screenshot = tmp_path / "web_chat.png"
    page.screenshot(screenshot)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / screenshot.name)
    assert page.errors == []


def test_stop_and_new_chat(page, server):
    page.set_field("api-key", API_KEY)
    page.set_field("temperature", "0")
    page.set_field("max-tokens", "200")
    page.type_and_send("Write a long story about a dragon.")
    page.wait_for(f"{LAST_ANSWER}?.querySelector('.content').textContent.length > 0", 60)
    page.eval("document.getElementById('stop').click()")
    stopped = _answer_when_done(page)
    assert stopped["stats"].endswith("stopped") and stopped["text"] and not stopped["error"]
    deadline = time.monotonic() + 30  # the engine takes the abort between two steps, slow on a busy machine
    while server.engine.has_unfinished_requests():  # the hang-up reached the engine, which aborted the request
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.1)

    page.eval("document.getElementById('new-chat').click()")
    assert page.eval("document.querySelectorAll('.msg').length") == 0
    assert page.errors == []
