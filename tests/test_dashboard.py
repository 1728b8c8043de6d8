"""The Grafana dashboard under `deploy/` queries only metrics and labels the balancer exposes.

A balancer in front of simulated backends is driven until every labelled series exists
(successes, a 500 that ejects a backend, a queue rejection, a client that leaves), then its
`/metrics` is scraped and parsed with prometheus_client's own parser. Every PromQL expression
of the dashboard (panels and template variables) is parsed with a real PromQL parser, so a
renamed metric or label, or a broken expression, fails here rather than as an empty panel.
"""

from __future__ import annotations

import asyncio
import json
import re
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from fake_llama import SLOTS_B, captured, models_with, router_fake
from llamacpp_sim import Fault, SimConfig
from serving import balancer_for, sims
from sim_support import wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PREFIX = "llamacpp_ha_"
# Prometheus adds these to every series when it scrapes; they are not in /metrics.
TARGET_LABELS = frozenset({"job", "instance"})
# The samples each kind of family has, by suffix.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$")
# Grafana's own variables stand where PromQL wants a duration.
_GRAFANA_DURATION = re.compile(r"\$\{?__(rate_interval|interval|range)\}?")


def exposed_series(exposition: str) -> dict[str, frozenset[str] | None]:
    """Sample name -> its label names (None: the family is declared but has no sample yet)."""
    series: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = series.get(sample.name) or set()
            labels.update(sample.labels)
            series[sample.name] = labels
    return {name: None if labels is None else frozenset(labels) for name, labels in series.items()}


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable, rows included."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target.get('refId')}", target.get("expr", "")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable ${variable['name']}",
                query.get("query", query) if isinstance(query, dict) else query,
            )


def _selectors(expr: Any) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(
        expr,
        lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return found


def problems(query: str, exposed: dict[str, frozenset[str] | None]) -> list[str]:
    """What in one dashboard query would not match the balancer's metrics; [] when all does."""
    match = _LABEL_VALUES.match(query)
    if match:
        found = problems(match["selector"], exposed)
        label = match["label"]
        for selector in _selectors(promql_parser.parse(match["selector"])):
            labels = exposed.get(selector.name or "") or frozenset()
            if label not in labels | TARGET_LABELS:
                found.append(f"label_values: {selector.name} has no label {label!r}")
        return found
    if not query.strip():
        return ["empty expression"]
    try:
        ast = promql_parser.parse(_GRAFANA_DURATION.sub("5m", query))
    except ValueError as error:
        return [f"does not parse: {error}"]
    found = []

    def labels_of(node: Any) -> frozenset[str]:
        every: set[str] = set(TARGET_LABELS)
        for selector in _selectors(node):
            every |= exposed.get(selector.name or "") or frozenset()
        return frozenset(every)

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or ""
            if not name.startswith(PREFIX):
                found.append(f"selector {name or node.prettify()!r} is not one of ours")
            elif name not in exposed:
                found.append(f"{name} is not exposed")
            elif exposed[name] is None:
                found.append(f"{name} has no sample: the test must produce one")
            else:
                labels = exposed[name] or frozenset()
                for matcher in node.matchers.matchers:
                    if matcher.name not in labels | TARGET_LABELS:
                        found.append(f"{name} has no label {matcher.name!r}")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            available = labels_of(node.expr)
            for label in node.modifier.labels:
                if label not in available:
                    found.append(f"{node.op} by/without {label!r}: no such label inside")
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            available = labels_of(node.lhs) | labels_of(node.rhs)
            matching = node.modifier.matching
            named = list(matching.labels if matching is not None else [])
            named += list(node.modifier.group_labels or [])
            for label in named:
                if label not in available:
                    found.append(f"on/ignoring/group {label!r}: no such label on either side")

    promql_parser.walk(ast, visit)
    return found


class DashboardTest(unittest.IsolatedAsyncioTestCase):
    _exposition: ClassVar[str | None] = None

    async def exposition(self) -> str:
        """The balancer's /metrics once every labelled series exists (scraped once per class)."""
        if DashboardTest._exposition is None:
            async with asyncio.timeout(20):
                DashboardTest._exposition = await self._scrape_after_traffic()
        return DashboardTest._exposition

    async def _scrape_after_traffic(self) -> str:
        fleet = [SimConfig(slots=1, profile="gpu-8b", name=n) for n in ("one", "two")]
        prompt = [{"role": "user", "content": "Tell me about load balancers. " * 20}]
        chat = "/v1/chat/completions"
        short = {"messages": prompt, "max_tokens": 4}
        async with (
            sims(*fleet) as backends,
            balancer_for(
                backends,
                eject_after_failures=1,
                max_ejected_fraction=0.5,
                max_queue=0,
                api_keys=[{"id": "dashboard", "key": "dashboard-key"}],
            ) as lb,
            httpx.AsyncClient(
                base_url=lb.url, timeout=10, headers={"Authorization": "Bearer dashboard-key"}
            ) as http,
        ):
            stats, registry = lb.balancer.stats, lb.balancer.registry
            # The same prompt again until a backend answers it from its prompt cache.
            for _ in range(10):
                self.assertEqual((await http.post(chat, json=short)).status_code, 200)
                if any(cached for b in stats.backends.values() for _, cached in b.prompts):
                    break
            else:
                self.fail("no prompt cache hit in 10 requests")

            # Every backend answers 500 until one is ejected (at most half the fleet may be).
            for backend in backends:
                backend.set_fault(Fault(error_500=True))
            for _ in range(10):
                await http.post(chat, json=short)
                if any(b.state == "ejected" for b in registry.backends):
                    break
            else:
                self.fail("no backend ejected after 10 answers of 500")
            for backend in backends:
                backend.set_fault(None)

            # A long stream holds the only slot left: the next request finds the queue full
            # (max_queue=0); then the streaming client leaves before the end.
            long_body = {"messages": prompt, "max_tokens": 500, "stream": True}
            async with http.stream("POST", chat, json=long_body) as stream:
                self.assertEqual(stream.status_code, 200)
                await anext(stream.aiter_bytes())
                full = await http.post(chat, json=short)
                self.assertEqual(full.status_code, 503, full.text)
            await wait_until(lambda: stats.disconnected >= 1)

            response = await http.get("/metrics")
            self.assertEqual(response.status_code, 200)
            return response.text + await self._scrape_router_mode() + await self._scrape_resume()

    async def _scrape_resume(self) -> str:
        """A stream whose backend crashes, continued on the other one."""
        fleet = [SimConfig(slots=2, profile="gpu-8b", name=n) for n in ("one", "two")]
        admin = {"Authorization": "Bearer admin-secret"}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
        async with (
            sims(*fleet) as (first, second),
            balancer_for([first, second], admin_keys=["admin-secret"]) as lb,
            httpx.AsyncClient(base_url=lb.url, timeout=10) as http,
        ):
            other = lb.balancer.registry.backends[1].name
            await http.post(f"/admin/backends/{other}/drain", headers=admin)
            first.set_fault(Fault(crash_after_chunks=20))
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                opened = False
                async for _ in response.aiter_lines():
                    if not opened:
                        opened = True
                        await http.post(f"/admin/backends/{other}/undrain", headers=admin)
            self.assertEqual(lb.balancer.stats.resumed, 1)
            return (await http.get("/metrics")).text

    async def _scrape_router_mode(self) -> str:
        """A cold model loaded on a router-mode server: scraped while it loads (what waits for
        it) and once it is loaded (the load, its time)."""
        body = {"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}]}
        async with (
            router_fake() as fake,
            balancer_for([fake], wait_ready=False) as lb,
            httpx.AsyncClient(base_url=lb.url, timeout=10) as http,
        ):

            def loading(path: str, body: object) -> None:
                if path == "/models/load":
                    fake.answer("/v1/models", 200, models_with({"tiny-b": {"value": "loading"}}))

            fake.on_post = loading
            await wait_until(lambda: len(lb.balancer.registry.backends) == 2)
            waiting = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await wait_until(lambda: len(lb.balancer.queue) == 1 and len(fake.posted) == 1)
            during = (await http.get("/metrics")).text
            fake.answer(SLOTS_B, *captured("router-slots-model.txt"))
            fake.answer("/v1/models", 200, models_with({"tiny-b": {"value": "loaded"}}))
            self.assertEqual((await waiting).status_code, 200)
            return during + (await http.get("/metrics")).text

    def load_dashboard(self) -> dict[str, Any]:
        dashboard: dict[str, Any] = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
        return dashboard

    async def test_every_query_matches_the_metrics(self) -> None:
        exposed = exposed_series(await self.exposition())
        queries = list(dashboard_queries(self.load_dashboard()))
        self.assertGreater(len(queries), 20)
        for where, query in queries:
            with self.subTest(where):
                self.assertEqual(problems(query, exposed), [], f"{where}: {query}")

    async def test_every_metric_is_on_the_dashboard(self) -> None:
        queried = {
            selector.name
            for _, query in dashboard_queries(self.load_dashboard())
            for selector in _selectors(
                promql_parser.parse(_GRAFANA_DURATION.sub("5m", _LABEL_VALUES.sub(r"\1", query)))
            )
        }
        families = {
            family.name: family.type
            for family in text_string_to_metric_families(await self.exposition())
            # The text format gives each counter's and histogram's _created its own family.
            if family.name.startswith(PREFIX) and not family.name.endswith("_created")
        }
        self.assertTrue(families)
        for name, kind in sorted(families.items()):
            with self.subTest(name):
                samples = {name + suffix for suffix in SUFFIXES.get(kind, ("",))}
                self.assertTrue(
                    samples & queried, f"{name} is exposed but no dashboard panel shows it"
                )

    def test_checker_catches_renames(self) -> None:
        exposed = exposed_series(
            "# TYPE llamacpp_ha_requests counter\n"
            'llamacpp_ha_requests_total{backend="a",status="200"} 1\n'
            "# TYPE llamacpp_ha_queue_wait_seconds histogram\n"
            'llamacpp_ha_queue_wait_seconds_bucket{le="+Inf"} 1\n'
            "llamacpp_ha_queue_wait_seconds_sum 0.1\n"
            "llamacpp_ha_queue_wait_seconds_count 1\n"
            "# TYPE llamacpp_ha_ejections counter\n"
        )
        good = [
            'sum by (backend) (rate(llamacpp_ha_requests_total{job=~"$job"}[$__rate_interval]))',
            "histogram_quantile(0.9, sum by (le)"
            " (rate(llamacpp_ha_queue_wait_seconds_bucket[5m])))",
            'label_values(llamacpp_ha_requests_total{job=~"$job"}, backend)',
        ]
        for query in good:
            self.assertEqual(problems(query, exposed), [], query)
        bad = {
            "rate(llamacpp_ha_request_total[5m])": "not exposed",
            "rate(llamacpp_ha_requests[5m])": "not exposed",  # a counter's samples end in _total
            "llamacpp_ha_queue_wait_seconds": "not exposed",  # a histogram has no bare sample
            'llamacpp_ha_requests_total{code="200"}': "no label 'code'",
            "sum by (reason) (llamacpp_ha_requests_total)": "no such label",
            "rate(llamacpp_ha_ejections_total[5m])": "no sample",
            "rate(other_requests_total[5m])": "not one of ours",
            "sum(rate(llamacpp_ha_requests_total[5m])": "does not parse",
            "label_values(llamacpp_ha_requests_total, code)": "no label 'code'",
        }
        for query, expected in bad.items():
            found = problems(query, exposed)
            self.assertTrue(any(expected in p for p in found), f"{query}: {found}")

    def test_prometheus_example_scrapes_the_metrics_path(self) -> None:
        text = (DEPLOY / "prometheus.yml").read_text()
        self.assertIn("scrape_configs:", text)
        self.assertRegex(text, r"\n\s+metrics_path: /metrics\n")
        self.assertIn("job_name: llamacpp-ha", text)


if __name__ == "__main__":
    unittest.main()
