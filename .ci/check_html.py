"""Load every page of the built book in headless Chromium and check what a reader would see.

Usage: python .ci/check_html.py [_build/html] [--screenshots DIR] [--chromium PATH]
                                [--window-size W,H]

The book is served on 127.0.0.1 (a free port) by Python's http.server. Chromium is driven
through the DevTools protocol over a small built-in WebSocket client, so nothing beyond the
standard library is needed. For each page it checks:

* the page loads (HTTP 200, no navigation error);
* no resource failed to load (HTTP status >= 400 or a network error) and nothing was
  requested from outside 127.0.0.1: the book must work offline (the browser's own request
  for /favicon.ico, made when a page names no icon, is not counted);
* no console error, no uncaught exception, no browser log entry of level error;
* every <img> is decoded (``decode()`` succeeds and ``naturalWidth > 0``);
* MathJax typeset every math element (each ``.math`` node holds an ``mjx-container``),
  no TeX error (``mjx-merror``) was produced, and no raw TeX (``$$``, ``\\(``, ``\\[`` or
  ``$...\\cmd...$``) is left in the visible prose outside code blocks.
* every display equation fits its column: a MathJax ``mjx-container[display="true"]``
  whose typeset width (its ``scrollWidth``, or the width of the ``mjx-math`` inside it) is
  larger than the content width of its parent element is cut off or needs scrolling, and
  fails the page (break it with ``aligned`` or ``split``).

Code cells and text outputs that need horizontal scrolling are counted and reported in each
page's summary line and in a total at the end, but do not fail the check.

Pages that are only a ``<meta http-equiv="Refresh">`` redirect (index.html) are checked for
a target that exists. Exit status 0 when every page passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

PAGE_TIMEOUT_S = 60.0
SETTLE_S = 0.5  # the network must be quiet this long before a page is checked

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1200,900",
]

# Runs in the page after load: waits for MathJax and images, then reports what it sees.
PAGE_PROBE = r"""
(async () => {
  const withTimeout = (p, ms) => Promise.race([p, new Promise(r => setTimeout(r, ms))]);
  const result = {mathjax: null, images: [], math: 0, untypeset: [], merrors: [], rawTex: [],
                  hasIcon: !!document.querySelector('link[rel~="icon"]')};
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await withTimeout(MathJax.startup.promise, 20000); result.mathjax = 'ready'; }
    catch (e) { result.mathjax = 'failed: ' + e; }
  }
  for (const img of document.images) { img.loading = 'eager'; }
  await withTimeout(Promise.all(Array.from(document.images).map(
      img => img.decode().then(() => null, () => null))), 20000);
  await withTimeout(document.fonts.ready, 10000);
  for (const img of document.images) {
    result.images.push({src: img.currentSrc || img.src, complete: img.complete,
                        width: img.naturalWidth, height: img.naturalHeight});
  }
  const maths = document.querySelectorAll('span.math, div.math');
  result.math = maths.length;
  for (const m of maths) {
    if (!m.querySelector('mjx-container')) result.untypeset.push(m.textContent.slice(0, 80));
  }
  for (const e of document.querySelectorAll('mjx-merror')) {
    result.merrors.push((e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120));
  }
  // Visible prose only: drop code, outputs shown as code, and typeset math.
  const main = (document.querySelector('main') || document.body).cloneNode(true);
  for (const e of main.querySelectorAll(
      'pre, code, .highlight, mjx-container, mjx-assistive-mml, script, style, noscript')) {
    e.remove();
  }
  const text = main.textContent;
  // Display math wider than its column (MathJax CHTML): cut off or scrolled for a reader.
  result.mathOverflow = [];
  for (const c of document.querySelectorAll('mjx-container[display="true"]')) {
    const parent = c.parentElement;
    if (!parent) continue;
    const style = getComputedStyle(parent);
    const available = parent.clientWidth - parseFloat(style.paddingLeft || '0')
                      - parseFloat(style.paddingRight || '0');
    const inner = c.querySelector('mjx-math');
    const width = Math.max(c.scrollWidth,
                           inner ? inner.getBoundingClientRect().width : 0);
    if (available > 0 && width > available + 1) {
      const tex = (c.querySelector('mjx-assistive-mml') || c).textContent
                  || (parent.getAttribute('data-tex') || '');
      result.mathOverflow.push({width: Math.round(width), available: Math.round(available),
                                text: tex.replace(/\s+/g, ' ').slice(0, 60)});
    }
  }
  // Code cells (their source) and their text outputs that need horizontal scrolling:
  // counted, not failed.
  const scrolls = e => e.scrollWidth > e.clientWidth + 1;
  const codeCells = Array.from(document.querySelectorAll('div.cell_input pre'));
  const outputs = Array.from(document.querySelectorAll('div.cell_output pre'));
  result.codeBlocks = codeCells.length;
  result.codeOverflow = codeCells.filter(scrolls).length;
  result.outputBlocks = outputs.length;
  result.outputOverflow = outputs.filter(scrolls).length;
  const patterns = [/\$\$/g, /\\\(/g, /\\\[/g, /\$[^$\n]*\\[A-Za-z]+[^$\n]*\$/g];
  for (const re of patterns) {
    for (const m of text.matchAll(re)) {
      const i = m.index;
      result.rawTex.push(text.slice(Math.max(0, i - 30), i + 50).replace(/\s+/g, ' '));
    }
  }
  return result;
})()
"""


# ---------------------------------------------------------------------------------------------
# A minimal WebSocket client (RFC 6455), enough for the DevTools protocol on localhost.


class WebSocket:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            response += chunk
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        self.fragments = b""
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head.decode(errors='replace')}")

    def _frame(self) -> tuple[int, int, bytes] | None:
        """Take one whole frame (fin, opcode, payload) off the buffer, or None if incomplete.

        Nothing is consumed until a frame is complete, so a socket timeout between two reads
        never loses bytes.
        """
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode, n, pos = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack(">Q", buf[2:10])[0], 10
        mask = None
        if buf[1] & 0x80:
            mask, pos = buf[pos:pos + 4], pos + 4
        if len(buf) < pos + n:
            return None
        payload, self.buffer = buf[pos:pos + n], buf[pos + n:]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return fin, opcode, payload

    def send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # FIN + text frame
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack(">H", n)
        else:
            header.append(0x80 | 127)
            header += struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def recv(self) -> str:
        """The next text message; raises TimeoutError when the socket timeout passes."""
        while True:
            frame = self._frame()
            if frame is None:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("DevTools closed the connection")
                self.buffer += chunk
                continue
            fin, opcode, payload = frame
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode == 0x9:  # ping: answer with a pong (masked, as a client must)
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                self.fragments += payload
                if fin:
                    message, self.fragments = self.fragments, b""
                    return message.decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class DevTools:
    """Commands and events of one browser connection (flattened target sessions)."""

    def __init__(self, url: str) -> None:
        self.ws = WebSocket(url)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = PAGE_TIMEOUT_S) -> dict:
        self.next_id += 1
        message: dict = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            self.ws.sock.settimeout(max(0.1, deadline - time.monotonic()))
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.sock.settimeout(left)
            try:
                reply = json.loads(self.ws.recv())
            except TimeoutError:
                return
            if "method" in reply:
                self.events.append(reply)


# ---------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(root: Path) -> tuple[socketserver.TCPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def start_chromium(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    with open(profile.parent / "chromium.log", "wb") as log:
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if port_file.exists():
            lines = port_file.read_text().split()
            if len(lines) >= 2:
                return proc, f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.1)
    proc.kill()
    tail = (profile.parent / "chromium.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"Chromium did not start (exit {proc.poll()}):\n{tail}")


REDIRECT = re.compile(r'^\s*<meta http-equiv="Refresh" content="0; url=([^"]+)"\s*/?>\s*$', re.I)


def pages_of(root: Path) -> list[Path]:
    skip = {"_static", "_sources", "_images"}
    return sorted(p for p in root.rglob("*.html")
                  if not skip.intersection(p.relative_to(root).parts))


CODE_OVERFLOW = {"cells": 0, "of": 0, "outputs": 0, "outputs_of": 0}
"""Code cells and text outputs that need horizontal scrolling, over all pages checked
(reported, not failed)."""


def math_overflow_problems(overflows: list[dict]) -> list[str]:
    """One problem line per display equation wider than its column (from the page probe)."""
    return [f"display math wider than its column ({o['width']} px > {o['available']} px): "
            f"{o['text']!r}" for o in overflows]


def check_page(dt: DevTools, base: str, rel: str, shots: Path | None) -> tuple[list[str], str]:
    """Problems found on one page, and a one-line summary."""
    target = dt.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    problems: list[str] = []
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.call(f"{domain}.enable", session=session)
        dt.events.clear()
        url = f"{base}/{rel}"
        nav = dt.call("Page.navigate", {"url": url}, session=session)
        if nav.get("errorText"):
            return [f"navigation failed: {nav['errorText']}"], "did not load"

        # Wait for the load event, then until no request has been pending for SETTLE_S.
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        loaded = False
        pending: set[str] = set()
        quiet_since = None
        seen = 0
        while time.monotonic() < deadline:
            dt.pump(0.1)
            for event in dt.events[seen:]:
                if event.get("sessionId") != session:
                    continue
                method, params = event["method"], event.get("params", {})
                if method == "Page.loadEventFired":
                    loaded = True
                elif method == "Network.requestWillBeSent":
                    pending.add(params["requestId"])
                elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                    pending.discard(params["requestId"])
            seen = len(dt.events)
            if loaded and not pending:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= SETTLE_S:
                    break
            else:
                quiet_since = None
        if not loaded:
            problems.append(f"no load event within {PAGE_TIMEOUT_S:.0f} s")
        if pending:
            problems.append(f"{len(pending)} requests still pending after "
                            f"{PAGE_TIMEOUT_S:.0f} s")

        probe = dt.call("Runtime.evaluate", {"expression": PAGE_PROBE, "awaitPromise": True,
                                             "returnByValue": True}, session=session)
        if "exceptionDetails" in probe:
            problems.append(f"page probe failed: {probe['exceptionDetails'].get('text')}")
            report: dict = {"images": [], "math": 0, "untypeset": [], "merrors": [],
                            "rawTex": [], "mathjax": None, "mathOverflow": [],
                            "codeBlocks": 0, "codeOverflow": 0}
        else:
            report = probe["result"]["value"]
        dt.pump(0.2)  # late console messages

        if shots is not None:
            shot = dt.call("Page.captureScreenshot", {"format": "png"}, session=session)
            out = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
            out.write_bytes(base64.b64decode(shot["data"]))

        # Browsers ask for /favicon.ico by themselves when a page names no icon; that request
        # is not the page's doing, so its 404 is not a problem of the book.
        implicit = set() if report.get("hasIcon") else {f"{base}/favicon.ico"}
        requests = 0
        urls: dict[str, str] = {}
        for event in dt.events:
            if event.get("sessionId") != session:
                continue
            method, params = event["method"], event.get("params", {})
            if method == "Network.requestWillBeSent":
                requests += 1
                req_url = params["request"]["url"]
                urls[params["requestId"]] = req_url
                host = urlparse(req_url).hostname
                if req_url.split(":", 1)[0] not in ("data", "blob") and host != "127.0.0.1":
                    problems.append(f"request outside the book (offline it fails): {req_url}")
            elif method == "Network.responseReceived":
                status = params["response"]["status"]
                if status >= 400 and params["response"]["url"] not in implicit:
                    problems.append(f"HTTP {status} for {params['response']['url']}")
                if params.get("type") == "Document" and status != 200:
                    problems.append(f"page answered HTTP {status}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                problems.append(f"load failed ({params.get('errorText')}): "
                                f"{urls.get(params['requestId'], params['requestId'])}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description", "")))
                                for a in params.get("args", []))
                problems.append(f"console.{params['type']}: {text[:300]}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                problems.append(f"uncaught exception: {str(text)[:300]}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                if entry.get("url") in implicit:
                    continue
                problems.append(f"browser log error: {entry['text'][:300]} {entry.get('url', '')}")

        for img in report["images"]:
            if not img["complete"] or img["width"] == 0:
                problems.append(f"image not decoded: {img['src'][:200]}")
        if report["math"] and report["mathjax"] != "ready":
            problems.append(f"page has {report['math']} math elements but MathJax is "
                            f"{report['mathjax'] or 'not loaded'}")
        for tex in report["untypeset"]:
            problems.append(f"math not typeset: {tex!r}")
        for err in report["merrors"]:
            problems.append(f"TeX error: {err!r}")
        for raw in report["rawTex"]:
            problems.append(f"raw TeX in the text: ...{raw}...")
        problems += math_overflow_problems(report.get("mathOverflow", []))
        for key, count in (("cells", "codeOverflow"), ("of", "codeBlocks"),
                           ("outputs", "outputOverflow"), ("outputs_of", "outputBlocks")):
            CODE_OVERFLOW[key] += report.get(count, 0)
        summary = (f"images {len(report['images'])}, math {report['math']}, "
                   f"requests {requests}; scrolling: code cells "
                   f"{report.get('codeOverflow', 0)} of {report.get('codeBlocks', 0)}, "
                   f"text outputs {report.get('outputOverflow', 0)} of "
                   f"{report.get('outputBlocks', 0)}")
        return problems, summary
    finally:
        dt.call("Target.closeTarget", {"targetId": target})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", default="_build/html", type=Path)
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--screenshots", type=Path, help="save a PNG of every page here")
    parser.add_argument("--window-size", default="1200,900", metavar="W,H",
                        help="browser window in CSS pixels (default 1200,900: the text "
                             "column is then about 590 px, 69 code characters; from 1440 "
                             "px wide it is 754 px, 89 characters)")
    args = parser.parse_args()

    root = args.html.resolve()
    if not (root / "index.html").exists():
        print(f"check_html: {root} holds no built book (no index.html)", file=sys.stderr)
        return 1
    if not shutil.which(args.chromium):
        print(f"check_html: Chromium not found at {args.chromium}", file=sys.stderr)
        return 1
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    CHROMIUM_FLAGS[:] = [f for f in CHROMIUM_FLAGS if not f.startswith("--window-size=")]
    CHROMIUM_FLAGS.append(f"--window-size={args.window_size}")
    pages = pages_of(root)
    server, port = serve(root)
    base = f"http://127.0.0.1:{port}"
    failures = 0
    with tempfile.TemporaryDirectory(prefix="check_html-") as tmp:
        proc, ws_url = start_chromium(args.chromium, Path(tmp) / "profile")
        try:
            dt = DevTools(ws_url)
            for page in pages:
                rel = page.relative_to(root).as_posix()
                match = REDIRECT.match(page.read_text(errors="replace"))
                if match:
                    dest = (page.parent / match.group(1)).resolve()
                    ok = dest.is_file() and root in dest.parents
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {rel}: redirect to {match.group(1)}"
                          + ("" if ok else " (missing)"))
                    continue
                try:
                    problems, summary = check_page(dt, base, rel, args.screenshots)
                except (RuntimeError, ConnectionError, OSError) as err:
                    problems, summary = [f"check crashed: {err}"], "not checked"
                problems = list(dict.fromkeys(problems))  # an image used twice fails twice
                print(f"{'FAIL' if problems else 'ok  '} {rel}: {summary}")
                for problem in problems:
                    print(f"       - {problem}")
                failures += bool(problems)
            dt.ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            server.shutdown()
    print(f"check_html: horizontal scrolling (reported, not failed): "
          f"{CODE_OVERFLOW['cells']} of {CODE_OVERFLOW['of']} code cells, "
          f"{CODE_OVERFLOW['outputs']} of {CODE_OVERFLOW['outputs_of']} text outputs")
    if failures:
        print(f"check_html: {failures} of {len(pages)} pages FAILED", file=sys.stderr)
        return 1
    print(f"check_html: all {len(pages)} pages passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
