"""The benchmark's folding of repetitions into medians and ranges, and its goal check."""

from __future__ import annotations

import unittest
from dataclasses import asdict
from typing import Any

from bench.metrics import RunResult
from bench.overhead import OverheadPlan, OverheadResult
from bench.overhead import _over as relay_over
from bench.regimes import REGIMES
from bench.report import carried_text, generator_text
from bench.summary import Spread, aggregate, goal_check, overhead_rows


def _run(contender: str, rep: int, workload: str = "chat-medium", **kw: Any) -> RunResult:
    fields: dict[str, Any] = {
        "workload": workload,
        "contender": contender,
        "label": contender,
        "requests": 200,
        "completed": 200,
        "failed": 0,
        "rejected": 0,
        "unfinished": 0,
        "wall_s": 10.0,
        "ttft_ms": {"p50": 10.0, "p90": 20.0, "p99": 40.0},
        "e2e_s": {"p50": 1.0, "p99": 2.0},
        "tpot_ms": 1.0,
        "req_per_s": 20.0,
        "out_tok_per_s": 3000.0,
        "prompt_tokens_computed": 1000,
        "prompt_tokens_cached": 1000,
        "hit_rate": 0.5,
        "hit_rate_client": None,
        "imbalance": 1.0,
        "tasks_per_backend": [50, 50, 50, 50],
        "balancer_cpu_s": 1.0,
        "regime": "decode-bound",
        "rep": rep,
        "seed": 7 + rep,
        "requests_deferred_max": 0,
    }
    fields.update(kw)
    return RunResult(**fields)


class SpreadTest(unittest.TestCase):
    def test_median_and_range_skip_missing_values(self) -> None:
        self.assertEqual(Spread.of([3.0, None, 1.0, 2.0]), Spread(2.0, 1.0, 3.0, 3))
        self.assertIsNone(Spread.of([None, None]))


class AggregateTest(unittest.TestCase):
    def test_ratio_to_round_robin_is_paired_by_repetition(self) -> None:
        runs = [
            _run("ha-round-robin", 0, prompt_tokens_computed=1000),
            _run("ha-round-robin", 1, prompt_tokens_computed=2000),
            _run("ha-affinity", 0, prompt_tokens_computed=500),
            _run("ha-affinity", 1, prompt_tokens_computed=500),
        ]
        rows = {a.contender: a for a in aggregate(runs, {})}
        ratio = rows["ha-affinity"].computed_vs_round_robin
        self.assertEqual(ratio, Spread(0.375, 0.25, 0.5, 2))
        self.assertEqual(rows["ha-affinity"].runs, 2)
        self.assertIsNone(rows["ha-affinity"].max_reorder_delay_s)

    def test_regimes_are_kept_apart(self) -> None:
        runs = [_run("ha-affinity", 0), _run("ha-affinity", 0, regime="prefill-bound")]
        self.assertEqual(len(aggregate(runs, {})), 2)


class GoalCheckTest(unittest.TestCase):
    def test_verdicts_compare_medians(self) -> None:
        runs = []
        for rep in range(3):
            runs.append(
                _run(
                    "ha-affinity",
                    rep,
                    hit_rate=0.8,
                    prompt_tokens_computed=400,
                    ttft_ms={"p50": 10.0, "p90": 20.0, "p99": 30.0},
                    # One bad repetition does not decide: the median does.
                    requests_deferred_max=3 if rep == 0 else 0,
                )
            )
            runs.append(_run("ha-round-robin", rep, prompt_tokens_computed=1000))
            runs.append(_run("ha-least-busy", rep, ttft_ms={"p50": 12.0, "p90": 20.0, "p99": 35.0}))
            runs.append(
                _run(
                    "sglang-ca", rep, hit_rate=0.85, ttft_ms={"p50": 9.0, "p90": 20.0, "p99": 90.0}
                )
            )
        verdicts = goal_check(aggregate(runs, {}), "ha-affinity", {"chat-medium": 0.85})
        cells = verdicts["chat-medium"]
        self.assertIs(cells["hit_vs_sglang"].ok, False)
        self.assertIs(cells["hit_vs_ceiling"].ok, True)  # 0.8 >= 0.9 * 0.85
        self.assertIs(cells["computed_vs_rr"].ok, True)  # 0.4 of round robin's
        self.assertIs(cells["ttft_p50"].ok, False)  # sglang-ca's 9 ms
        self.assertIs(cells["ttft_p99"].ok, True)  # 30 <= 0.67 * 90 and <= 35
        self.assertIs(cells["deferred"].ok, True)
        self.assertIsNone(cells["random_vs_lb"].ok)  # not the random workload
        self.assertIn("no", cells["ttft_p50"].cell())

    def test_random_within_three_percent_of_least_busy(self) -> None:
        runs = [
            _run("ha-affinity", 0, workload="random", ttft_ms={"p50": 102, "p90": 0, "p99": 210}),
            _run("ha-least-busy", 0, workload="random", ttft_ms={"p50": 100, "p90": 0, "p99": 200}),
        ]
        cells = goal_check(aggregate(runs, {}), "ha-affinity", {"random": 0.001})["random"]
        self.assertIs(cells["random_vs_lb"].ok, False)  # p99 5% above
        self.assertIsNone(cells["hit_vs_ceiling"].ok)  # no hit rate to be had
        self.assertIsNone(cells["computed_vs_rr"].ok)


class RegimesTest(unittest.TestCase):
    def test_every_regime_has_the_same_workload_kinds_and_enough_requests(self) -> None:
        kinds = None
        for regime in REGIMES.values():
            workloads = regime.workloads(20251127)
            names = [w.name for w in workloads]
            if kinds is None:
                kinds = names
            self.assertEqual(names, kinds)
            for w in workloads:
                self.assertGreaterEqual(w.n_requests, 200, f"{regime.name}/{w.name}")
                wall = w.span_s / regime.spec_for(w.name).time_scale
                self.assertLess(wall, 25.0, f"{regime.name}/{w.name}")


def _over(contender: str, rep: int, **kw: Any) -> OverheadResult:
    fields: dict[str, Any] = {
        "contender": contender,
        "label": contender,
        "rep": rep,
        "ttft_low_ms": {"p50": 1.0, "p99": 2.0},
        "ttft_high_ms": {"p50": 1.5, "p99": 3.0},
        "relay_ms": {128: {"p50": 0.5, "p99": 1.0}, 2048: {"p50": 1.0, "p99": 5.0}},
    }
    fields.update(kw)
    return OverheadResult(**fields)


class OverheadRowsTest(unittest.TestCase):
    def test_added_ttft_is_taken_against_direct_of_the_same_repetition(self) -> None:
        over = [
            _over("direct", 0, ttft_low_ms={"p50": 1.0, "p99": 2.0}),
            _over("ha", 0, ttft_low_ms={"p50": 1.5, "p99": 4.0}),
            _over("direct", 1, ttft_low_ms={"p50": 3.0, "p99": 5.0}),
            _over("ha", 1, ttft_low_ms={"p50": 3.2, "p99": 5.5}),
            _over("direct", 2, ttft_low_ms={"p50": 1.0, "p99": 2.0}),
            _over("ha", 2, ttft_low_ms={"p50": 2.0, "p99": 3.0}),
        ]
        rows = {r.contender: r for r in overhead_rows(over, {"ha": "llamacpp-ha"})}
        ha = rows["ha"]
        self.assertEqual(ha.label, "llamacpp-ha")
        self.assertEqual(ha.reps, 3)
        assert ha.ttft_low_p50_ms is not None
        assert ha.ttft_low_p99_ms is not None
        self.assertAlmostEqual(ha.ttft_low_p50_ms.median, 0.5)
        self.assertAlmostEqual(ha.ttft_low_p50_ms.lo, 0.2)
        self.assertAlmostEqual(ha.ttft_low_p50_ms.hi, 1.0)
        self.assertAlmostEqual(ha.ttft_low_p99_ms.median, 1.0)
        # Direct's own row is absolute.
        self.assertEqual(rows["direct"].ttft_low_p50_ms, Spread(1.0, 1.0, 3.0, 3))

    def test_figures_and_failures_over_repetitions(self) -> None:
        over = [
            _over("direct", 0),
            _over("ha", 0, cpu_ms_per_request=0.2, cpu_ms_per_stream1=0.3, failures=1),
            _over("direct", 1),
            _over("ha", 1, cpu_ms_per_request=0.1, cpu_ms_per_stream1=None, failures=2),
        ]
        ha = overhead_rows(over, {})[1]
        self.assertEqual(ha.cpu_ms_per_request, Spread(0.15000000000000002, 0.1, 0.2, 2))
        self.assertEqual(ha.cpu_ms_per_stream1, Spread(0.3, 0.3, 0.3, 1))
        self.assertEqual(ha.failures, 3)

    def test_streams_carried_per_repetition_against_its_direct(self) -> None:
        ok = {128: {"p50": 0.5, "p99": 1.0}, 2048: {"p50": 1.0, "p99": 5.0}}
        broke = {128: {"p50": 0.5, "p99": 1.0}, 2048: {"p50": 40.0, "p99": 90.0}}
        never_open = {128: {"p50": 0.5, "p99": 1.0}, 2048: {"p50": 1.0, "p99": None}}
        over = [
            _over("direct", 0, relay_ms=ok),
            _over("ha", 0, relay_ms=ok),
            _over("direct", 1, relay_ms=ok),
            _over("ha", 1, relay_ms=broke),
            _over("direct", 2, relay_ms=ok),
            _over("ha", 2, relay_ms=never_open),
        ]
        rows = {r.contender: r for r in overhead_rows(over, {})}
        self.assertEqual(rows["ha"].carried, Spread(128, 128, 2048, 3))
        self.assertEqual(rows["ha"].carried_why, ("max", "limit", "limit"))
        self.assertEqual(carried_text(rows["ha"], 128), "128 [128-2,048]")
        self.assertEqual(rows["direct"].carried, Spread(2048, 2048, 2048, 3))
        self.assertEqual(carried_text(rows["direct"], 128), "2,048 (the load generator alone)")

    def test_the_generator_caps_what_can_be_shown(self) -> None:
        capped = {128: {"p50": 0.5, "p99": 1.0}, 2048: {"p50": 30.0, "p99": 60.0}}
        over = [_over("direct", 0, relay_ms=capped), _over("ha", 0, relay_ms=capped)]
        ha = overhead_rows(over, {})[1]
        self.assertEqual(carried_text(ha, 128), ">= 128 (load generator limit)")
        every = [_over("direct", 0), _over("ha", 0)]
        self.assertEqual(carried_text(overhead_rows(every, {})[1], 128), ">= 2,048 (max tested)")

    def test_a_step_never_held_open_is_over_the_limit(self) -> None:
        self.assertTrue(relay_over({"p50": 1.0, "p99": None}, {"p50": 1.0, "p99": 1.0}))
        base = {"p50": 1.0, "p99": None}
        self.assertTrue(relay_over(base, base))
        self.assertFalse(relay_over({"p50": 1.0, "p99": 15.0}, {"p50": 1.0, "p99": 1.0}))

    def test_generator_line_names_processes_and_streams(self) -> None:
        plan = asdict(OverheadPlan())
        text = generator_text({"overhead_plan": plan})
        self.assertIn(f"{plan['clients']} client process(es) x up to 1,024 streams each", text)
        self.assertIn("2,048 in all", text)
