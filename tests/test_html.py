"""The static HTML leaderboard: structure (no external resources, flags explained, details with
provenance and plots) and behaviour in headless Chromium: clicking a column header sorts the
rows, "details" opens a row, and a screenshot is saved.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: NUL
separated JSON on file descriptors 3 and 4), so no websocket or selenium package is needed. The
browser tests skip when Chromium is not installed (``apt-get install chromium``). The screenshot
goes to ``$ROBUSTMATRIX_ARTIFACTS`` when set, else to the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from leaderboard.entries import sample_entries, write_entry
from leaderboard.formats import publish

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                             "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and Path(p).exists()), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    es = sample_entries()
    tsne = root / "entries" / "figures" / "tsne.png"  # a figure lies inside the entry's folder
    tsne.parent.mkdir(parents=True)
    _tiny_png(tsne)
    es[0]["figures"] = [{"title": "t-SNE of the latent space", "path": "figures/tsne.png"}]
    for e in es:
        write_entry(e, root / "entries")
    from leaderboard.entries import load_entries

    paths = publish(load_entries(root / "entries"), root / "site", formats=["html"])
    return paths["html"].parent


def _tiny_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.scatter([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


# static checks ------------------------------------------------------------------------------
def test_pages_are_self_contained(site):
    pages = sorted(p.name for p in site.glob("*.html"))
    assert pages == ["index.html", "test_tiny_l2.html", "test_tiny_linf.html"]
    for p in site.glob("*.html"):
        html = p.read_text()
        assert not re.search(r"<script[^>]+src=", html)
        assert not re.search(r"<link[^>]+href=", html)
        assert not re.search(r"(src|href)=\"(https?:)?//", html.replace(
            'href="https://example.org/bitdepth"', ""))  # only the paper link points outside


def test_flags_details_provenance_and_plots_are_in_the_page(site):
    html = (site / "test_tiny_linf.html").read_text()
    assert 'class="flag" title="Zero, NaN or missing input gradients: 16/16 samples' in html
    assert "Try: use BPDA or a black-box attack" in html
    assert "Flags on this board" in html
    for text in ("weights sha256", "config hash", "code version", "sample ids", "v0.1.0-test",
                 "34" * 32, "adversarials sha256", "t-SNE of the latent space"):
        assert text in html, text
    assert html.count("data:image/svg+xml;base64,") >= 4  # per-row attack plots + scatter + sweep
    assert "data:image/png;base64," in html  # the defense's own figure
    assert html.count('<tbody class="entry"') == 3


# in the browser -------------------------------------------------------------------------------
class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, user_data_dir: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        cmd = ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', CHROMIUM, *FLAGS,
               f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
               "--window-size=1280,900", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read())

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        self.session = self.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                           "flatten": True},
                                 browser=True)["sessionId"]
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900,
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the element."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                   "button": "left", "clickCount": 1})

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            self.send("Browser.close", browser=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


ROWS = "Array.from(document.querySelectorAll('table.board')[0].tBodies).map(b => b.dataset.defense)"


@needs_chromium
def test_sorting_details_and_screenshot_in_chromium(site, tmp_path):
    import base64

    browser = DevTools(tmp_path / "profile")
    try:
        browser.open((site / "test_tiny_linf.html").as_uri())
        by_rank = ["Adv. trained CNN", "Bit-depth CNN", "Undefended_100%"]
        assert browser.js(ROWS) == by_rank
        browser.click("th[data-key='clean'] button")             # first click: highest first
        assert browser.js(ROWS) == ["Undefended_100%", "Bit-depth CNN", "Adv. trained CNN"]
        assert browser.js("document.querySelector(\"th[data-key='clean']\")"
                          ".getAttribute('aria-sort')") == "descending"
        browser.click("th[data-key='clean'] button")             # again: reversed
        assert browser.js(ROWS) == ["Adv. trained CNN", "Bit-depth CNN", "Undefended_100%"]
        browser.click("th[data-key='defense'] button")           # text column
        assert browser.js(ROWS) == sorted(by_rank)
        browser.click("th[data-key='worst'] button")
        assert browser.js(ROWS) == by_rank
        # the details row travels with its defense and opens on click
        browser.click("tbody[data-defense='Bit-depth CNN'] button.toggle")
        assert browser.js("document.querySelector(\"tbody[data-defense='Bit-depth CNN'] "
                          "tr.details\").hidden") is False
        assert "t-SNE" in browser.js("document.querySelector(\"tbody[data-defense='Bit-depth "
                                     "CNN'] tr.details\").innerText")
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        browser.close()
    out = Path(os.environ.get("ROBUSTMATRIX_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "leaderboard_test_tiny_linf.png"
    path.write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    width, height = int.from_bytes(shot[16:20], "big"), int.from_bytes(shot[20:24], "big")
    assert (width, height) == (1280, 900)


@needs_chromium
def test_hash_sort_with_dump_dom(site, tmp_path):
    url = (site / "test_tiny_linf.html").as_uri() + "#sort=clean:asc"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    order = re.findall(r'<tbody class="entry" data-defense="([^"]+)"', dom)
    assert order == ["Adv. trained CNN", "Bit-depth CNN", "Undefended_100%"]
    assert 'data-sorted="clean:asc"' in dom
