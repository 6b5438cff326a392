"""Check the built book in headless Chromium, offline: figures drawn, maths typeset, no console errors.

    python .ci/render_check.py _build/html _build/screenshots

Serves the site on 127.0.0.1, drives Chromium through the DevTools protocol over a pipe
(--remote-debugging-pipe: no extra packages), and for every chapter page checks that
  * every plotly figure was drawn (an SVG inside each .plotly-graph-div),
  * the maths was typeset by the bundled MathJax (mjx-container elements, no raw $$ left),
  * a precomputed slider switches state (the last slider step is applied with Plotly.update),
  * nothing was logged as a console error or exception, and no request left the machine.
It saves screenshots of each page's top, of each figure, and of a slider moved to its last step;
it exits 1 on any failure.
"""
from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe", "--hide-scrollbars", "--mute-audio"]
EXTERNAL_ASSET = re.compile(r'<(?:script|link|img)[^>]+(?:src|href)="(?:https?:)?//(?!127\.0\.0\.1)[^"]+"[^>]*>')

STATE_JS = """(() => {
  const figs = [...document.querySelectorAll('.plotly-graph-div')];
  const main = document.querySelector('main') || document.body || document.documentElement;
  return {
    ready: document.readyState === 'complete' && location.protocol === 'http:',
    figures: figs.length,
    drawn: figs.filter(f => f.querySelector('svg.main-svg')).length,
    sliders: figs.filter(f => f.layout && f.layout.sliders && f.layout.sliders.length).length,
    math_nodes: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    raw_tex: ((main && main.innerText || '').match(/\\$\\$|\\\\\\[|\\\\\\(/g) || []).length,
    mathjax: !!(window.MathJax && window.MathJax.startup),
  };
})()"""

SLIDER_JS = """(async () => {
  const gd = [...document.querySelectorAll('.plotly-graph-div')].find(f => f.layout && f.layout.sliders);
  gd.scrollIntoView({block: 'center'});
  const steps = gd.layout.sliders[0].steps, last = steps[steps.length - 1];
  await Plotly.update(gd, last.args[0], {...last.args[1], 'sliders[0].active': steps.length - 1});
  const shown = gd.data.map((t, i) => t.visible === true ? i : -1).filter(i => i >= 0);
  const want = last.args[0].visible.map((v, i) => v ? i : -1).filter(i => i >= 0);
  return {ok: JSON.stringify(shown) === JSON.stringify(want), title: gd.layout.title.text};
})()"""


class Chromium:
    """Minimal DevTools-protocol client over Chromium's pipe transport (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # move the child's ends above fd 10 so that placing them on fds 3 and 4 cannot clobber them
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def place_pipes():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=place_pipes, pass_fds=(3, 4))
        os.close(child_r)
        os.close(child_w)
        self.writer = os.fdopen(to_chrome_w, "wb", buffering=0)
        self.reader = os.fdopen(from_chrome_r, "rb", buffering=0)
        self.buffer, self.events, self.next_id = b"", [], 0

    def _read_message(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = self.reader.read(1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.writer.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60.0) -> None:
        """Read messages until `method` arrives for `session` (kept in self.events)."""
        deadline, seen = time.time() + timeout, len(self.events)
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events[seen:]):
            if time.time() > deadline:
                raise RuntimeError(f"no {method} within {timeout}s")
            self.events.append(self._read_message())

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=30)


def serve(root: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser hung up early: harmless
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def problems_from(events: list[dict], session: str, host: str) -> list[str]:
    """Console errors, uncaught exceptions and failed or off-machine requests seen by the page."""
    found = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails'].get('exception', {}).get('description')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                      for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error" \
                and not params["entry"].get("url", "").endswith("/favicon.ico"):  # asked for by the browser
            found.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith((host, "data:", "blob:", "about:")):
                found.append(f"request left the machine: {url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            found.append(f"request failed: {params.get('errorText')}")
    return found


def wait_for(browser: Chromium, session: str, timeout: float = 60.0) -> dict:
    """Poll the page until its figures are drawn and MathJax has finished (or time runs out)."""
    deadline = time.time() + timeout
    while True:
        state = browser.evaluate(session, STATE_JS)
        done = state["ready"] and state["drawn"] == state["figures"] and (state["math_nodes"] == 0 or state["typeset"] > 0)
        if done or time.time() > deadline:
            return state
        time.sleep(0.5)


def screenshot(browser: Chromium, session: str, path: Path) -> None:
    data = browser.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
    path.write_bytes(base64.b64decode(data))


def check_page(browser: Chromium, url: str, host: str, shots: Path, name: str) -> list[str]:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session)
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_event("Page.loadEventFired", session)
    state = wait_for(browser, session)
    time.sleep(1.0)  # let MathJax finish the last typesetting pass and fonts arrive
    state = browser.evaluate(session, STATE_JS)
    screenshot(browser, session, shots / f"{name}.png")
    for i in range(state["figures"]):
        browser.evaluate(session, f"document.querySelectorAll('.plotly-graph-div')[{i}]"
                                  ".scrollIntoView({block: 'center'})")
        screenshot(browser, session, shots / f"{name}-figure{i + 1}.png")
    failures = []
    if state["drawn"] != state["figures"]:
        failures.append(f"{state['figures'] - state['drawn']} of {state['figures']} plotly figures not drawn")
    if state["math_nodes"] and not state["typeset"]:
        failures.append(f"maths not typeset ({state['math_nodes']} math nodes, MathJax loaded: {state['mathjax']})")
    if state["raw_tex"]:
        failures.append(f"{state['raw_tex']} raw TeX delimiters left on the page")
    if state["sliders"]:
        moved = browser.evaluate(session, SLIDER_JS)
        time.sleep(0.5)
        screenshot(browser, session, shots / f"{name}-slider.png")
        if not moved["ok"]:
            failures.append("the slider's last step did not show its precomputed traces")
    failures += problems_from(browser.events, session, host)
    browser.send("Target.closeTarget", {"targetId": target})
    print(f"  {name}: {state['drawn']}/{state['figures']} figures drawn, {state['sliders']} with sliders, "
          f"{state['typeset']} formulas typeset" + ("" if not failures else " -- FAILED"))
    return failures


def main(site: str, shots_dir: str) -> int:
    site_root, shots = Path(site).resolve(), Path(shots_dir)
    shots.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        print("chromium not found (apt-get install -y chromium)")
        return 1
    pages = sorted(site_root.glob("book/*.html"))
    failures = {}
    for page in pages:  # nothing may load from outside: the site must work offline
        external = EXTERNAL_ASSET.findall(page.read_text())
        if external:
            failures[page.name] = [f"external asset: {tag}" for tag in external]
    server = serve(site_root)
    host = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(binary, profile)
        try:
            for page in pages:
                rel = page.relative_to(site_root).as_posix()
                problems = check_page(browser, f"{host}/{rel}", host, shots, page.stem)
                if problems:
                    failures.setdefault(page.name, []).extend(problems)
        finally:
            browser.close()
            server.shutdown()
    for name, problems in failures.items():
        print(f"FAIL {name}")
        for p in problems:
            print(f"   {p}")
    print(f"render check: {len(pages) - len(failures)} of {len(pages)} pages fine; screenshots in {shots}")
    return 1 if failures or not pages else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
