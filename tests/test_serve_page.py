"""The chat page in a real browser: headless Chromium (Debian's chromium package; skipped
without it) loads the page from a running `offload serve`, sends a message the way a person
does (types it, presses Send), and the test reads the streamed reply and the expert panel
from the DOM. Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so no extra package is needed.

$OFFLOAD_PAGE_SCREENSHOT=path.png keeps a screenshot of the page after the reply."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time

import pytest

from offload.server import ServerConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install chromium)")


class Browser:
    """Chromium over the DevTools protocol on a pipe: call(method, **params) -> result."""

    def __init__(self, user_dir):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={user_dir}", "--window-size=1280,800",
             "about:blank"],
            # the pipe's ends become fds 3 and 4 in the child (kept open: close_fds would close them)
            close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(to_chrome_r, 3), os.dup2(from_chrome_w, 4)))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, session: bool = True, **params):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError as e:  # the page is not there yet
                value, last_error = None, e
            else:
                last_error = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression} ({last_error})"
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def test_the_page_chats_and_shows_the_expert_cache(tmp_path):
    from test_serve import RunningServer, slow_model

    # a budget that holds a few experts (the panel has hits, misses and experts on disk to show),
    # and slowed down a little so that the stop button has a reply to stop
    server = RunningServer(ServerConfig(model_name="demo"), slow_model("54MB"))
    browser = Browser(tmp_path / "chromium")
    try:
        browser.open(server.url + "/")
        browser.wait_for("document.getElementById('model-name').textContent === 'demo'")
        browser.wait_for("document.getElementById('status').textContent === 'ready'")
        # the settings a person would set, then type and send
        browser.js("""(() => {
            const set = (id, v) => { const e = document.getElementById(id); e.value = v;
                                     e.dispatchEvent(new Event('change')); };
            set('temperature', '0'); set('max_tokens', '40');
            document.getElementById('input').value = 'In the beginning';
            document.getElementById('send').click();
        })()""")
        browser.wait_for("document.querySelector('.msg.assistant .meta') !== null")
        reply = browser.js("document.querySelector('.msg.assistant .content').textContent")
        meta = browser.js("document.querySelector('.msg.assistant .meta').textContent")
        expected = server.client().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "In the beginning"}], max_tokens=40,
            temperature=0).choices[0].message.content
        assert reply == expected and reply.strip()
        assert "40 tokens" in meta and "finish: length" in meta
        assert browser.js("document.querySelector('.msg.user').textContent") == "In the beginning"
        assert browser.js("document.getElementById('send').disabled") is False
        # the panel, after its next poll: figures and a heat map with 4 layers x 8 experts
        browser.wait_for("document.getElementById('tokens').textContent.startsWith('40 generated')")
        hit_rate = browser.js("document.getElementById('hit-rate').textContent")
        assert "%" in hit_rate and "misses" in hit_rate
        assert browser.js("document.getElementById('mib-token').textContent").endswith("MiB/token")
        assert "budget" in browser.js("document.getElementById('memory').textContent")
        colours = browser.js("""(() => {
            const c = document.getElementById('heatmap'), ctx = c.getContext('2d');
            const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
            for (let i = 0; i < d.length; i += 4) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
            return [c.width, c.height, seen.size];
        })()""")
        assert colours[0] == 8 * 16 and colours[1] == 4 * 16 and colours[2] >= 3  # cells in several states
        shot = os.environ.get("OFFLOAD_PAGE_SCREENSHOT")
        if shot:
            png = browser.call("Page.captureScreenshot", format="png")["data"]
            with open(shot, "wb") as f:
                f.write(base64.b64decode(png))
        # the stop button: a long reply stopped by a click ends as "stopped"
        browser.js("""(() => {
            document.getElementById('max_tokens').value = '';
            document.getElementById('input').value = 'And God said';
            document.getElementById('send').click();
        })()""")
        browser.wait_for("document.querySelectorAll('.msg.assistant').length === 2 && "
                         "!document.getElementById('stop').disabled")
        browser.js("document.getElementById('stop').click()")
        browser.wait_for("document.querySelectorAll('.msg.assistant .meta').length === 2")
        assert "finish: stopped" in browser.js("document.querySelectorAll('.msg.assistant .meta')[1].textContent")
    finally:
        browser.close()
        server.stop()
