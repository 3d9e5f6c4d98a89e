"""Headless Chromium driven over the DevTools protocol, as a reader meets a page: every request the page makes
is recorded (and names other than 127.0.0.1 do not resolve: the network is off), with failed loads and
uncaught script errors, for ``tests/test_book.py`` and the page and offline ``/docs`` tests of
``tests/test_serve.py``."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from test_dashboard import CHROMIUM, stop_group

LOCAL = ("file://", "data:", "blob:", "about:", "http://127.0.0.1:", "chrome-error:", "devtools:")


class Tab:
    """One page of the browser: ``call`` a DevTools method, ``evaluate`` JavaScript, ``open`` a URL."""

    def __init__(self, ws):
        self.ws, self.counter, self.events = ws, 0, []

    def call(self, method: str, **params) -> dict:
        self.counter += 1
        self.ws.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.counter:
                assert "error" not in message, message
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, *, wait: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=wait)
        assert "exceptionDetails" not in result, (expression, result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, (expression, value)
            time.sleep(0.05)
        return value

    def open(self, url: str, ready: str = "document.readyState === 'complete'") -> dict:
        """Load ``url`` and wait until ``ready`` holds and the fonts are in; what the page asked for:
        ``{"requests": [url, ...], "failed": [(url, error), ...], "errors": [uncaught script errors]}``."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("location.href !== 'about:blank' && " + ready)
        self.evaluate("document.fonts.ready.then(() => true)", wait=True)
        time.sleep(0.2)
        self.evaluate("1")  # collect the events that arrived meanwhile
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"}
        failed = [(urls.get(e["params"]["requestId"], "?"), e["params"]["errorText"]) for e in self.events
                  if e["method"] == "Network.loadingFailed"]
        failed += [(e["params"]["response"]["url"], e["params"]["response"]["status"]) for e in self.events
                   if e["method"] == "Network.responseReceived" and e["params"]["response"].get("status", 0) >= 400]
        errors = [e["params"]["exceptionDetails"].get("exception", {}).get("description")
                  or e["params"]["exceptionDetails"].get("text") for e in self.events
                  if e["method"] == "Runtime.exceptionThrown"]
        return {"requests": sorted(set(urls.values())), "failed": failed, "errors": errors}


def outside(requests: list[str]) -> list[str]:
    """The requests that would leave the machine (anything but local files, data and 127.0.0.1)."""
    return [url for url in requests if not url.startswith(LOCAL)]


@contextmanager
def chromium_tab() -> Iterator[Tab]:
    """Headless Chromium with a throw-away profile and no network (every host name but 127.0.0.1 fails to
    resolve); its one tab, with the network and runtime events on. Stopped with its helpers afterwards."""
    import websocket

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--allow-file-access-from-files", "--window-size=1280,900", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        ws = None
        try:
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 120
            while not (active.is_file() and active.read_text().strip()):
                assert time.monotonic() < deadline and browser.poll() is None, "Chromium did not start"
                time.sleep(0.2)
            port = active.read_text().split()[0]
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                    pages = [p for p in json.loads(response.read()) if p["type"] == "page"]
                if pages:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.2)
            ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60)
            tab = Tab(ws)
            for domain in ("Page", "Network", "Runtime"):
                tab.call(f"{domain}.enable")
            yield tab
        finally:
            if ws is not None:
                ws.close()
            stop_group(browser)
