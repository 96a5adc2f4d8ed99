"""Headless Chromium (the Debian package) driven over the DevTools protocol: open a page and report what a user
would see — its text after scripts ran, script errors, and whether an injected script executed.

No Playwright or Selenium: they download their own browsers at run time; this talks to the system Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def click_text(text: str) -> str:
    """A JS expression that clicks the innermost element whose text is exactly `text`."""
    return (f"[...document.querySelectorAll('body *')].filter(e => e.textContent.trim() === {json.dumps(text)})"
            ".pop()?.click()")


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class PageVisit:
    status: int | None
    text: str
    errors: list[str] = field(default_factory=list)
    probes: dict[str, Any] = field(default_factory=dict)


class Session:
    def __init__(self, socket: Any) -> None:
        self.socket, self.ids = socket, itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(await self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    async def wait_for(self, method: str, timeout: float) -> dict[str, Any]:
        async def pump() -> dict[str, Any]:
            for event in self.events:
                if event.get("method") == method:
                    return event
            while True:
                event = json.loads(await self.socket.recv())
                self.events.append(event)
                if event.get("method") == method:
                    return event
        return await asyncio.wait_for(pump(), timeout)

    async def drain(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._forever(), seconds)

    async def _forever(self) -> None:
        while True:
            self.events.append(json.loads(await self.socket.recv()))


async def _visit(endpoint: str, url: str, headers: dict[str, str], probes: dict[str, str], actions: list[str],
                 settle_s: float, timeout: float) -> PageVisit:
    async with websockets.connect(endpoint, max_size=64 * 2**20) as socket:
        cdp = Session(socket)
        target = (await cdp.call("Target.createTarget", url="about:blank"))["targetId"]
        session = (await cdp.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Runtime", "Page", "Network", "Log"):
            await cdp.call(f"{domain}.enable", session)
        if headers:
            await cdp.call("Network.setExtraHTTPHeaders", session, headers=headers)
        await cdp.call("Page.navigate", session, url=url)
        await cdp.wait_for("Page.loadEventFired", timeout)
        await cdp.drain(settle_s)  # the page renders after load (React in Evidently's report)
        for action in actions:  # e.g. a click on a tab, as a reader would
            await cdp.call("Runtime.evaluate", session, expression=action)
            await cdp.drain(settle_s / 2)
        text = (await cdp.call("Runtime.evaluate", session, expression="document.body.innerText",
                               returnByValue=True))["result"].get("value", "")
        results = {}
        for name, expression in probes.items():
            results[name] = (await cdp.call("Runtime.evaluate", session, expression=expression,
                                            returnByValue=True))["result"].get("value")
        status = None
        errors = []
        for event in cdp.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.responseReceived" and params.get("type") == "Document":
                status = params["response"]["status"]
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif (method == "Log.entryAdded" and params["entry"]["level"] == "error"
                  and not params["entry"].get("url", "").endswith("/favicon.ico")):  # browsers ask every server
                errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        return PageVisit(status, text, errors, results)


def visit(url: str, *, headers: dict[str, str] | None = None, probes: dict[str, str] | None = None,
          actions: list[str] | None = None, settle_s: float = 3.0, timeout: float = 60.0) -> PageVisit:
    """Open `url` in a fresh headless Chromium profile and return what the page showed and raised."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium found (apt-get install chromium)")
    # Chromium's helper processes may still write to the profile while it is removed: ignore what they leave.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            endpoint = _devtools_endpoint(process, Path(profile), timeout)
            return asyncio.run(_visit(endpoint, url, headers or {}, probes or {}, actions or [], settle_s, timeout))
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop Chromium and its renderer/zygote helpers (one process group: it was started in its own session)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _devtools_endpoint(process: subprocess.Popen[bytes], profile: Path, timeout: float) -> str:
    """Chromium writes its DevTools port and browser path to <profile>/DevToolsActivePort once it listens."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Chromium exited with {process.returncode} before listening")
        lines = marker.read_text().split() if marker.exists() else []
        if len(lines) >= 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.1)
    raise RuntimeError(f"Chromium did not open its DevTools port in {timeout}s")
