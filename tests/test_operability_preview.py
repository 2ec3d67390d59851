"""`escalation-comms preview` opened in a real headless Chromium, driven over the DevTools protocol.

Every email of the gallery is loaded on its own at 375 px (a phone) and 600 px
(the template's desktop width): its ticket ID must be visible text and nothing
may overflow horizontally. Screenshots land in var/preview/screenshots/ for
people to look at. The browser is Debian's `chromium` (.ci/run installs it);
the email's remote logo is never fetched: every host name resolves to nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import ROOT, clean_env, write_config

SCREENSHOTS = ROOT / "var" / "preview" / "screenshots"
#: a guard against a hung browser, not a speed assertion
STEP_TIMEOUT = 60.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--allow-file-access-from-files",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def chromium_binary() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


class Page:
    """One tab of a headless Chromium, spoken to over the DevTools protocol (a websocket)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session_id: str | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loads: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Page.loadEventFired":
                self._loads.put_nowait(data)
        for future in self._pending.values():
            future.set_exception(ConnectionError("the browser closed the DevTools connection"))

    async def send(self, method: str, *, browser: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session_id and not browser:
            message["sessionId"] = self.session_id
        await self.ws.send_str(json.dumps(message))
        async with asyncio.timeout(STEP_TIMEOUT):
            answer = await future
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    async def open_tab(self) -> None:
        target = await self.send("Target.createTarget", browser=True, url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", browser=True, targetId=target["targetId"], flatten=True
        )
        self.session_id = attached["sessionId"]
        await self.send("Page.enable")

    async def goto(self, url: str, width: int, height: int = 900, *, mobile: bool = False) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        while not self._loads.empty():
            self._loads.get_nowait()
        navigated = await self.send("Page.navigate", url=url)
        assert "errorText" not in navigated, f"{url}: {navigated['errorText']}"
        async with asyncio.timeout(STEP_TIMEOUT):
            await self._loads.get()
        await self.evaluate("document.fonts.ready.then(() => true)")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path, width: int, *, mobile: bool = False) -> None:
        """The whole page: the viewport is stretched to the document's height first."""
        height = int(await self.evaluate("Math.max(document.documentElement.scrollHeight, 200)"))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_save, path, base64.b64decode(shot["data"]))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@asynccontextmanager
async def chromium(binary: str, profile: Path) -> AsyncIterator[Page]:
    process = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not (match := re.search(r"DevTools listening on (ws://\S+)", seen[-1] if seen else "")):
                line = await process.stderr.readline()
                if not line:
                    raise AssertionError("chromium exited before DevTools listened:\n" + "".join(seen))
                seen.append(line.decode(errors="replace"))

        async def discard(stream: asyncio.StreamReader) -> None:
            while await stream.read(65536):
                pass

        drain = asyncio.create_task(discard(process.stderr))  # a full pipe would stall the browser
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(match.group(1), max_msg_size=0)
            page = Page(ws)
            try:
                await page.open_tab()
                yield page
            finally:
                await page.close()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if drain is not None:
            drain.cancel()


#: what the browser reports about one email document
INSPECT = """
((ticket) => {
  const root = document.documentElement;
  const limit = root.clientWidth + 1;
  const tickets = [];
  const outside = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (!node.data.trim()) continue;
    const style = getComputedStyle(node.parentElement);
    if (style.visibility === 'hidden' || Number(style.opacity) === 0) continue;
    const whole = document.createRange();
    whole.selectNodeContents(node);
    for (const r of whole.getClientRects()) {
      if (r.width > 0 && (r.right > limit || r.left < -1)) outside.push(node.data.trim().slice(0, 60));
    }
    const at = node.data.indexOf(ticket);
    if (at < 0) continue;
    const range = document.createRange();
    range.setStart(node, at);
    range.setEnd(node, at + ticket.length);
    const rects = [...range.getClientRects()].filter(r => r.width > 0 && r.height > 0);
    if (rects.length && rects.every(r => r.left >= -1 && r.right <= limit)) tickets.push(node.data.trim());
  }
  return {scrollWidth: root.scrollWidth, clientWidth: root.clientWidth,
          bodyScrollWidth: document.body.scrollWidth, visibleTickets: tickets, textOutside: outside};
})
"""

GALLERY = """
(() => [...document.querySelectorAll('section.email')].map(s => ({
  id: s.id, html: s.dataset.html, ticket: s.dataset.ticket,
  text: s.querySelector('pre').textContent,
  frames: [...s.querySelectorAll('iframe')].map(f => {
    const doc = f.contentDocument;
    return {width: f.clientWidth, src: f.getAttribute('src'),
            loaded: !!(doc && doc.body && doc.body.innerText.includes(s.dataset.ticket)),
            scrollWidth: doc ? doc.documentElement.scrollWidth : null,
            clientWidth: doc ? doc.documentElement.clientWidth : null};
  }),
})))()
"""


def run_preview(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`escalation-comms preview --config CONFIG ARGS...` in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "preview", "--config", str(config), *args],
        env=clean_env(),
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gallery as the CLI writes it: `escalation-comms preview --out <tmp>`."""
    site = tmp_path_factory.mktemp("preview-site")
    config = write_config(site)
    out = site / "gallery"
    done = run_preview(config, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "index.html")
    return out


@pytest.fixture
def browser_binary() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip(
            "no chromium binary on PATH: install Debian's `chromium` package (.ci/run does when it can) "
            "or point $CHROMIUM at one"
        )
    return binary


@pytest.mark.anyio
async def test_preview_gallery_shows_every_email_with_its_ticket_and_no_overflow_in_chromium(
    gallery: Path, browser_binary: str, tmp_path: Path
) -> None:
    async with chromium(browser_binary, tmp_path / "chromium-profile") as page:
        await page.goto((gallery / "index.html").as_uri(), width=1400)
        sections = await page.evaluate(GALLERY)
        await page.screenshot(SCREENSHOTS / "index.png", width=1400)

        ids = {s["id"] for s in sections}
        for use_case in ("UC2", "UC3"):
            for role in ("customer", "bank_team"):
                assert f"{use_case}-{role}" in ids and f"{use_case}-{role}-long" in ids
        for section in sections:
            assert section["ticket"] in section["text"], f"{section['id']}: plain text lacks the ticket ID"
            assert sorted(round(f["width"]) for f in section["frames"]) == [375, 600], section["id"]
            for frame in section["frames"]:
                assert frame["loaded"], f"{section['id']}: frame {frame['src']} did not show the ticket ID"
                assert frame["scrollWidth"] <= frame["clientWidth"], f"{section['id']}: {frame}"

        problems = []
        for section in sections:
            url = (gallery / section["html"]).as_uri()
            for width, mobile in ((375, True), (600, False)):
                await page.goto(url, width=width, mobile=mobile)
                seen = await page.evaluate(f"{INSPECT}({json.dumps(section['ticket'])})")
                await page.screenshot(
                    SCREENSHOTS / f"{section['id']}-{width}.png", width=width, mobile=mobile
                )
                where = f"{section['html']} at {width} px"
                if not seen["visibleTickets"]:
                    problems.append(f"{where}: ticket ID {section['ticket']} is not visible")
                if seen["scrollWidth"] > seen["clientWidth"] or seen["bodyScrollWidth"] > seen["clientWidth"]:
                    problems.append(
                        f"{where}: overflows horizontally (scrollWidth {seen['scrollWidth']}, "
                        f"body {seen['bodyScrollWidth']} > clientWidth {seen['clientWidth']})"
                    )
                if seen["textOutside"]:
                    problems.append(f"{where}: text beyond the right edge: {seen['textOutside'][:3]}")
    assert not problems, "\n".join(problems)
    assert (SCREENSHOTS / "UC2-customer-375.png").stat().st_size > 0


def test_preview_with_use_case_writes_only_that_use_case(tmp_path: Path) -> None:
    config = write_config(tmp_path / "site")
    out = tmp_path / "only-uc3"
    done = run_preview(config, "--use-case", "uc3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["index.html"]
        + [
            f"UC3-{role}{suffix}.{ext}"
            for role in ("customer", "bank_team")
            for suffix in ("", "-long")
            for ext in ("html", "txt")
        ]
    )
    index = (out / "index.html").read_text()
    assert 'id="UC3-customer"' in index and "UC2" not in index


def test_preview_refuses_an_unknown_use_case_naming_the_configured_ones(tmp_path: Path) -> None:
    config = write_config(tmp_path / "site")
    done = run_preview(config, "--use-case", "UC9", "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "unknown use case UC9" in done.stderr and "UC2, UC3" in done.stderr
    assert not (tmp_path / "out").exists()
