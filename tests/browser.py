"""A headless Chromium driven through the DevTools protocol, for tests that check what a person
sees: load a page, read its text, click a link, ask whether its images loaded.

    with Browser.start(tmp_path / "chromium") as b:
        b.navigate("file:///tmp/site/index.html")
        assert "production" in b.text()
        b.click('a[href="models/demo/index.html"]')
        assert b.evaluate("document.title") == "demo"

No driver package: Chromium is started with --remote-debugging-port=0, says which port it took on
stderr ("DevTools listening on ws://..."), and one page target is driven over a websocket
(websockets' sync client). Chromium and every process it starts run in their own process group,
which `close` kills, so a failing test leaves no browser behind.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
_LISTENING = re.compile(r"DevTools listening on (ws://127\.0\.0\.1:(\d+)/\S+)")
_STARTUP_SECONDS = 30


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self._ids = itertools.count(1)
        self._events: list[dict] = []
        self._socket = None
        self.requested: list[str] = []
        """Every URL the page asked for since start (Network.requestWillBeSent), to check that
        a page opened from disk fetches nothing from the network."""

    @classmethod
    def start(cls, profile: Path) -> Browser:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        log = profile.parent / f"{profile.name}.stderr"
        command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        with open(log, "wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                       start_new_session=True)  # its own process group: close() kills the lot
        browser = cls(process, 0, log)
        try:
            browser.port = browser._wait_for_port()
            page = next(t for t in browser._targets() if t["type"] == "page")
            browser._socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            browser.call("Page.enable")
            browser.call("Runtime.enable")
            browser.call("Network.enable")
        except BaseException:
            browser.close()
            raise
        return browser

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + _STARTUP_SECONDS
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log.read_text(errors="replace"))
            if match:
                return int(match.group(2))
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port within {_STARTUP_SECONDS}s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def _targets(self) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        if not any(t["type"] == "page" for t in targets):
            request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as answer:
                targets.append(json.load(answer))
        return targets

    # ------------------------------------------------------------ the protocol

    def call(self, method: str, timeout: float = 15, **params) -> dict:
        """Send one command; events that arrive before its answer are kept for wait_for."""
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self._on_event(message)

    def _on_event(self, message: dict) -> None:
        if message["method"] == "Network.requestWillBeSent":
            self.requested.append(message["params"]["request"]["url"])
        self._events.append(message)

    def wait_for(self, event: str, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self._events):
                if message["method"] == event:
                    return self._events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no {event} within {timeout}s")
            try:
                message = json.loads(self._socket.recv(timeout=remaining))
            except TimeoutError:
                continue
            if "method" in message:
                self._on_event(message)

    # ------------------------------------------------------------ what a test asks

    def navigate(self, url: str) -> None:
        self._events.clear()
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def url(self) -> str:
        return self.evaluate("location.href")

    def click(self, selector: str) -> None:
        """Click the element, as a person would, and wait for the page it leads to to load."""
        before = self.url()
        self._events.clear()
        if not self.evaluate(f"(() => {{ const a = document.querySelector({json.dumps(selector)}); if (a) a.click(); return !!a; }})()"):
            raise BrowserError(f"no element matches {selector} on {before}")
        self.wait_for("Page.loadEventFired")
        if self.url() == before:
            raise BrowserError(f"clicking {selector} on {before} did not navigate")

    def images_loaded(self) -> bool:
        return self.evaluate("document.images.length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)")

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except Exception:  # closing a dead socket: the kill below is what matters
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader, or its zombie keeps the group "alive"
                if not _group_alive(self.process.pid):
                    return
                time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
