"""The monitor page in a real browser: headless Debian chromium, driven over the DevTools protocol.

The balancer runs in front of simulated backends under load; the test reads what the page
shows (not `/monitor/data`): a row per backend, numbers that move, charts of the history that
draw and move (sampled every 0.5 s here, through `History`'s constructor), a legend for every
abbreviation, one unit for every time, a killed backend shown as dead, a "data unavailable"
banner once the balancer is gone. It saves a screenshot to `test-output/monitor.png`.

The DevTools protocol is spoken directly over a websocket (aiohttp, already a dependency):
no browser download, no driver whose version has to match the browser's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import tempfile
import unittest
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from llamacpp_ha.config import build_config
from llamacpp_ha.monitor import History
from llamacpp_ha.proxy import create_app
from llamacpp_ha.registry import Health
from llamacpp_sim import SimConfig
from serving import assert_no_leaks, serve_app, sims
from sim_support import wait_until

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# Config names are shown on the page: this one must appear as text, never become markup.
DASH = "\u2013"  # what the page prints for "no value"
HOSTILE_NAME = '<img src=x onerror="window.__injected=1">'

# What the page shows, read from the DOM as a person would see it (textContent).
READ_PAGE_JS = """(() => {
  const text = (el) => el ? el.textContent.trim() : null;
  const backends = {};
  for (const row of document.querySelectorAll("#backends tr[data-backend]")) {
    const cells = {};
    for (const cell of row.querySelectorAll("[data-field]")) {
      cells[cell.dataset.field] = text(cell);
    }
    const badge = row.querySelector('[data-field="state"] > *');
    cells.state_class = badge ? badge.className : null;
    cells.state_color = badge ? getComputedStyle(badge).color : null;
    backends[row.dataset.backend] = cells;
  }
  const overview = {};
  for (const el of document.querySelectorAll("#summary [data-field], #overview [data-field]")) {
    overview[el.dataset.field] = text(el);
  }
  const keyed = (id) => Object.fromEntries([...document.querySelectorAll(`#${id} tr[data-key]`)]
    .map((row) => [row.dataset.key, [...row.querySelectorAll("td")].map(text)]));
  return {
    status: document.body.dataset.status,
    banner: text(document.getElementById("banner")),
    order: [...document.querySelectorAll("#backends tr[data-backend]")]
      .map((row) => row.dataset.backend),
    backends, overview,
    totals: keyed("totals"), latency: keyed("latency"), errors: keyed("errors"),
    injected: window.__injected ?? null,
    images: document.images.length,
  };
})()"""


# The charts as drawn: per chart its caption, how many samples it drew and the newest one's
# time, each series' path (and its number of points) and the value its legend shows.
READ_CHARTS_JS = """(() => Object.fromEntries(
  [...document.querySelectorAll("#charts figure[data-chart]")].map((fig) => [fig.dataset.chart, {
    title: fig.querySelector("figcaption").textContent.trim(),
    samples: Number(fig.dataset.samples),
    last_t: fig.dataset.lastT,
    x_ticks: fig.querySelectorAll("g.axis.x text").length,
    y_ticks: fig.querySelectorAll("g.axis.y text").length,
    series: Object.fromEntries([...fig.querySelectorAll("path[data-series]")].map((path) => [
      path.dataset.series, {points: Number(path.dataset.points), d: path.getAttribute("d"),
       max: path.dataset.max === "" ? null : Number(path.dataset.max)}])),
    legend: Object.fromEntries([...fig.querySelectorAll(".legend li")].map((li) => [
      li.dataset.series, li.querySelector(".value").textContent.trim()])),
  }])))()"""

# Every abbreviation on the page (an <abbr>) and the legend's terms.
READ_LEGEND_JS = """(() => ({
  abbrs: [...document.querySelectorAll("abbr")].map((a) => [a.textContent.trim(), a.title]),
  terms: [...document.querySelectorAll("#glossary dt")].map((dt) => dt.textContent.trim()),
}))()"""


class BrowserError(Exception):
    pass


class Browser:
    """One headless chromium process and a DevTools websocket to it."""

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="llamacpp-ha-chromium-"))
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self.exceptions: list[str] = []

    async def start(self) -> None:
        profile = self._tmp / "profile"
        profile.mkdir()
        with _open_log(self._tmp / "chromium.log") as log:
            # A session of its own, so aclose() can end the wrapper script and every child.
            self._proc = await asyncio.create_subprocess_exec(
                CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        # Chromium writes its port (0 asked it to choose) and the browser's path to this file.
        port_file = profile / "DevToolsActivePort"
        try:
            async with asyncio.timeout(15):
                while not port_file.exists() or len(port_file.read_text().split()) < 2:
                    if self._proc.returncode is not None:
                        raise BrowserError(f"chromium exited: {self.log_tail()}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise BrowserError(f"chromium did not start in 15 s: {self.log_tail()}") from None
        port, path = port_file.read_text().split()[:2]
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(
            f"ws://127.0.0.1:{port}{path}",
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        )
        self._reader = asyncio.create_task(self._read())

    def log_tail(self) -> str:
        try:
            lines = (self._tmp / "chromium.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(message.data)
                future = self._pending.pop(data.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(data)
                elif data.get("method") == "Runtime.exceptionThrown":
                    details = data["params"]["exceptionDetails"]
                    self.exceptions.append(
                        details.get("exception", {}).get("description") or details["text"]
                    )
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BrowserError("DevTools connection closed"))
            self._pending.clear()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        assert self._ws is not None
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send_json(message)
        try:
            async with asyncio.timeout(10):
                reply = await future
        except TimeoutError:
            raise BrowserError(f"{method}: no answer from chromium in 10 s") from None
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def open(self, url: str) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        navigation = await page.send("Page.navigate", {"url": url})
        if navigation.get("errorText"):
            raise BrowserError(f"navigating to {url}: {navigation['errorText']}")
        await page.wait_for("document.readyState === 'complete'", "the page loaded")
        return page

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                await asyncio.wait_for(self._proc.wait(), 5)
        shutil.rmtree(self._tmp, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"evaluate: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    async def read(self) -> dict[str, Any]:
        shown: dict[str, Any] = await self.evaluate(READ_PAGE_JS)
        return shown

    async def wait_for(self, expression: str, what: str, within_s: float = 5.0) -> Any:
        """Poll a JavaScript expression until it is truthy."""
        try:
            async with asyncio.timeout(within_s):
                while not (value := await self.evaluate(expression)):  # noqa: ASYNC110 - a DOM has no event to await from here
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"the page did not show {what} within {within_s} s") from None
        return value

    async def wait_until_shown(self, predicate: Any, what: str, within_s: float = 5.0) -> Any:
        """Poll what the page shows until `predicate(shown)` holds; returns that reading."""
        shown: dict[str, Any] = {}
        try:
            async with asyncio.timeout(within_s):
                while not predicate(shown := await self.read()):  # noqa: ASYNC110 - as above
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(
                f"the page did not show {what} within {within_s} s; it showed {shown}"
            ) from None
        return shown

    async def screenshot(self, path: Path) -> None:
        shot = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        _write(path, base64.b64decode(shot["data"]))


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def number(text: str | None) -> int:
    """A count as the page prints it ("1,234"); -1 for a dash."""
    digits = (text or "").replace(",", "")
    return int(digits) if digits.isdigit() else -1


async def load(url: str, stop: asyncio.Event, sent: list[int]) -> None:
    """One client in a loop: streamed chat completions sharing a system prompt (cache hits)."""
    system = "You are a terse assistant for the monitor test. " * 20
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not stop.is_set():
            body = {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"question {len(sent)}"},
                ],
                "max_tokens": 24,
                "stream": True,
            }
            # A backend killed mid-stream cuts some answers short: that is the point.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                    await response.read()
            sent.append(1)


class MonitorPageTest(unittest.IsolatedAsyncioTestCase):
    async def test_page_shows_the_fleet_live(self) -> None:
        if not os.access(CHROMIUM, os.X_OK):
            self.fail(f"{CHROMIUM} not found: run scripts/install-test-deps.sh")
        # Generous for a busy 2-core machine: it takes about 15 s on an idle one.
        async with asyncio.timeout(90):
            await self._run()

    async def _run(self) -> None:
        browser = Browser()
        self.addAsyncCleanup(browser.aclose)
        await browser.start()

        fleet = (
            SimConfig(slots=2, profile="gpu-8b", name="alpha"),
            SimConfig(slots=2, profile="gpu-8b", name="beta"),
            SimConfig(slots=2, profile="gpu-8b", name="hostile"),
        )
        names = ["alpha", "beta", HOSTILE_NAME]
        async with sims(*fleet) as backends:
            config = build_config(
                {
                    "backends": [
                        {"name": n, "url": b.url} for n, b in zip(names, backends, strict=True)
                    ],
                    "poll_interval_s": 0.1,
                    "queue_timeout_s": 10,
                }
            )
            app = create_app(config)
            # A sample every 0.5 s instead of 5 s, set before the lifespan starts the sampler.
            app.state.balancer.stats.history = History(interval_s=0.5)
            async with serve_app(app) as lb:
                balancer = lb.balancer
                await wait_until(
                    lambda: all(b.health is Health.READY for b in balancer.registry.backends)
                )
                page = await browser.open(f"{lb.url}/monitor")

                shown = await page.wait_until_shown(
                    lambda s: s.get("status") == "live" and len(s["backends"]) == 3,
                    "a live row per backend",
                )
                self.assertEqual(shown["order"], names)
                for name in names:
                    self.assertEqual(shown["backends"][name]["name"], name)
                    self.assertEqual(shown["backends"][name]["state"], "ready")
                    self.assertEqual(shown["backends"][name]["slots_text"], "0 / 2")
                # The hostile name is text: no element, no script ran.
                self.assertIsNone(shown["injected"])
                self.assertEqual(shown["images"], 0)
                await self._check_external(page, backends[0].url)

                stop = asyncio.Event()
                sent: list[int] = []
                # 10 clients for 6 slots: every slot busy and a few requests queued.
                clients = [asyncio.create_task(load(lb.url, stop, sent)) for _ in range(10)]
                try:
                    await self._check_under_load(page, names)
                    await self._check_charts(page, names)
                    await self._check_poll_rate(page)
                    await backends[1].aclose()
                    shown = await page.wait_until_shown(
                        lambda s: s["backends"]["beta"]["state"] == "dead",
                        "the killed backend as dead",
                    )
                    beta, alpha = shown["backends"]["beta"], shown["backends"]["alpha"]
                    self.assertIn("state-dead", beta["state_class"])
                    self.assertNotEqual(beta["state_color"], alpha["state_color"])
                    self.assertTrue(beta["last_error"], "a dead backend shows why")
                    self.assertEqual(shown["overview"]["ready_count"], "2 / 3")
                    # The others carry on serving.
                    before = number(alpha["served"])
                    await page.wait_until_shown(
                        lambda s: number(s["backends"]["alpha"]["served"]) > before,
                        "alpha still serving",
                    )
                    await page.screenshot(OUTPUT / "monitor.png")
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*clients), 10)
                await assert_no_leaks(balancer)

                shown = await page.wait_until_shown(
                    lambda s: (
                        s["overview"]["running"] == "0" and s["overview"]["queue_depth"] == "0"
                    ),
                    "the fleet idle again",
                )
                succeeded = number(shown["totals"]["succeeded"][0])
                self.assertGreater(succeeded, 0)
                self.assertEqual(shown["overview"]["succeeded"], shown["totals"]["succeeded"][0])

            # The balancer is gone: the page says so rather than freezing on old numbers.
            shown = await page.wait_until_shown(
                lambda s: s["status"] == "unavailable", "that data is unavailable"
            )
            self.assertIn("Data unavailable", shown["banner"])
            self.assertEqual(shown["order"], names, "the last data stays on the page")
        self.assertEqual(browser.exceptions, [], "the page threw in the browser")

    async def _check_poll_rate(self, page: Page) -> None:
        fetches = (
            "performance.getEntriesByType('resource')"
            ".filter((e) => e.name.endsWith('/monitor/data')).length"
        )
        before = await page.evaluate(fetches)
        await asyncio.sleep(2.5)
        polled = await page.evaluate(fetches) - before
        self.assertGreaterEqual(polled, 2, "the page polls monitor/data at least every second")

    async def _check_under_load(self, page: Page, names: list[str]) -> None:
        first = await page.read()
        served_before = sum(number(first["backends"][n]["served"]) for n in names)
        # Readings once a second (the page's own pace) until every moving number has moved.
        seen_in_flight = seen_queued = seen_busy_bar = seen_cache_hit = False
        for _ in range(8):
            await asyncio.sleep(1)
            shown = await page.read()
            rows = shown["backends"]
            seen_in_flight |= any(number(rows[n]["in_flight"]) > 0 for n in names)
            seen_queued |= number(shown["overview"]["queue_depth"]) > 0
            seen_busy_bar |= any(rows[n]["slots_text"].startswith("2 / 2") for n in names)
            seen_cache_hit |= any(rows[n]["cache_hit_rate"].endswith("%") for n in names)
            served = sum(number(rows[n]["served"]) for n in names)
            # Both latency figures need a first answer in the page's window: on a loaded
            # machine that can come a reading after the rest.
            timed = DASH not in (shown["latency"]["ttfb"][0], rows[names[0]]["ttfb_ms_p50"])
            if all((seen_in_flight, seen_queued, seen_busy_bar, seen_cache_hit, timed)) and (
                served > served_before
            ):
                break
        else:
            self.fail(
                f"under load the page never showed all of: requests in flight {seen_in_flight},"
                f" a queue {seen_queued}, a full backend {seen_busy_bar},"
                f" a cache hit rate {seen_cache_hit}, first-token times {timed}, served counts"
                f" rising; last: {shown}"
            )
        self.assertNotEqual(shown["latency"]["ttfb"][0], DASH)
        self.assertNotEqual(shown["backends"][names[0]]["ttfb_ms_p50"], DASH)
        # The Running card is the sum of the table's Running column, whatever is queued.
        running = sum(number(shown["backends"][n]["in_flight"]) for n in names)
        self.assertEqual(number(shown["overview"]["running"]), running)
        self.assertNotIn("in_flight", shown["totals"], "a count of now is not a total")
        # One unit for every time: milliseconds, never seconds.
        times = [
            *[cell for row in shown["latency"].values() for cell in row],
            *[shown["backends"][n]["ttfb_ms_p50"] for n in names],
            shown["overview"]["queue_oldest_wait"],
            shown["overview"]["max_reorder_delay"],
        ]
        for text in times:
            self.assertRegex(text, rf"^(\d[\d,]*(\.\d)? ms|{DASH})$")
        legend = await page.evaluate(READ_LEGEND_JS)
        terms = {t.strip() for dt in legend["terms"] for t in dt.split(",")}
        self.assertIn("ext.", terms)
        self.assertTrue(legend["abbrs"], "the abbreviations are marked up")
        for text, title in legend["abbrs"]:
            self.assertTrue(title, f"{text} has a tooltip")
            self.assertIn(text, terms, f"{text} is in the legend")

    async def _check_external(self, page: Page, alpha_url: str) -> None:
        """A client talking to alpha directly, around the balancer: an "ext." slot, explained."""
        started = asyncio.Event()

        async def direct() -> None:
            body = {"prompt": "around the balancer", "n_predict": 2000, "stream": True}
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{alpha_url}/completion", json=body) as response,
            ):
                await response.content.readline()
                started.set()
                await response.read()  # until cancelled

        task = asyncio.create_task(direct())
        try:
            await asyncio.wait_for(started.wait(), 10)
            shown = await page.wait_until_shown(
                lambda s: "ext." in s["backends"]["alpha"]["slots_text"], "an external slot"
            )
            self.assertEqual(shown["backends"]["alpha"]["slots_text"], "1 / 2 (1 ext.)")
            title = await page.evaluate(
                """document.querySelector('tr[data-backend="alpha"] abbr').title"""
            )
            self.assertIn("did not come through this balancer", title)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await page.wait_until_shown(
            lambda s: s["backends"]["alpha"]["slots_text"] == "0 / 2", "the external slot free"
        )

    async def _check_charts(self, page: Page, names: list[str]) -> None:
        """Under load the charts draw a line per series and move as samples come."""

        def drawn(charts: dict[str, Any]) -> bool:
            return bool(
                set(charts) == {"requests", "ttft", "queue", "cache", "slots"}
                and all(
                    line["points"] >= 2 for c in charts.values() for line in c["series"].values()
                )
                and set(charts["slots"]["series"]) == set(names)
            )

        async def charts_when(predicate: Any, what: str) -> dict[str, Any]:
            charts: dict[str, Any] = {}
            try:
                async with asyncio.timeout(20):
                    while not predicate(charts := await page.evaluate(READ_CHARTS_JS)):  # noqa: ASYNC110 - a DOM has no event to await from here
                        await asyncio.sleep(0.1)
            except TimeoutError:
                raise AssertionError(
                    f"the charts did not show {what}; they showed {charts}"
                ) from None
            return charts

        first = await charts_when(drawn, "a line with points for every series")
        for chart in first.values():
            self.assertGreaterEqual(chart["x_ticks"], 1, f"{chart['title']}: a time axis")
            self.assertGreaterEqual(chart["y_ticks"], 2, f"{chart['title']}: a value axis")
            for line in chart["series"].values():
                self.assertRegex(line["d"], r"^M[\d.]+ [\d.]+")
        self.assertEqual(set(first["slots"]["legend"]), set(names))
        self.assertIn("(ms)", first["ttft"]["title"])
        # Under load: requests answered, some waiting, busy slots, prompts from the cache.
        loaded = await charts_when(
            lambda c: (
                c["requests"]["legend"]["answered"] not in (DASH, "0.00/s")
                and any(number(v) > 0 for v in c["slots"]["legend"].values())
                and c["cache"]["legend"]["hit"].endswith("%")
            ),
            "the load",
        )
        # And they move: a newer sample, drawn (its line is not the same path as before).
        moved = await charts_when(
            lambda c: c["requests"]["last_t"] != loaded["requests"]["last_t"],
            "a newer sample",
        )
        for chart in ("requests", "ttft", "queue", "slots"):
            before, after = loaded[chart]["series"], moved[chart]["series"]
            self.assertNotEqual(
                [s["d"] for s in before.values()], [s["d"] for s in after.values()], chart
            )
        # What was drawn under load: a queue (10 clients for 6 slots) and full backends.
        self.assertGreater(moved["queue"]["series"]["queued"]["max"], 0)
        self.assertEqual(max(s["max"] for s in moved["slots"]["series"].values()), 2)


if __name__ == "__main__":
    unittest.main()
