"""``RESULTS.md`` and ``results.json``: the tables, the setup that produced them, the caveats."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.decision import DecisionRun
from bench.decision import section as decision_section
from bench.metrics import RunResult
from bench.overhead import RELAY_LIMIT_MS, OverheadResult
from bench.summary import (
    GOALS,
    MEANINGFUL_CEILING,
    Aggregate,
    OverheadRow,
    Spread,
    aggregate,
    goal_check,
    overhead_rows,
)


def _f(value: float | None, digits: int = 0, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def run_line(r: RunResult) -> str:
    return (
        f"ttft p50 {_f(r.ttft_ms['p50'])} p99 {_f(r.ttft_ms['p99'])} ms, "
        f"e2e p99 {_f(r.e2e_s['p99'], 2)} s, {r.completed}/{r.requests} ok "
        f"({r.rejected} rejected), hit {_pct(r.hit_rate)}, imbalance {_f(r.imbalance, 2)}"
    )


def overhead_line(o: OverheadResult) -> str:
    relay = ", ".join(f"{n}:{_f(v.get('p99'), 1)}" for n, v in o.relay_ms.items())
    return (
        f"ttft low p50 {_f(o.ttft_low_ms.get('p50'), 2)} p99 {_f(o.ttft_low_ms.get('p99'), 2)} "
        f"ms, high p50 {_f(o.ttft_high_ms.get('p50'), 2)} ms, cpu "
        f"{_f(o.cpu_ms_per_request, 3)} ms/req {_f(o.cpu_ms_per_stream1, 3)} ms/stream1 "
        f"{_f(o.cpu_us_per_chunk, 1)} us/chunk, {_f(o.rss_kb_per_stream, 1)} KiB/stream "
        f"({o.open_streams} open), {o.failures} failed, relay p99 by streams {relay}"
    )


def _spread(value: Spread | None, digits: int = 0, scale: float = 1.0) -> str:
    """The median, and the range of the runs when they differ: ``17 [15-20]``."""
    if value is None:
        return "n/a"
    median = _f(value.median, digits, scale)
    if value.n < 2 or _f(value.lo, digits, scale) == _f(value.hi, digits, scale):
        return median
    return f"{median} [{_f(value.lo, digits, scale)}-{_f(value.hi, digits, scale)}]"


def _spread_pct(value: Spread | None) -> str:
    if value is None:
        return "n/a"
    if value.n < 2 or _pct(value.lo) == _pct(value.hi):
        return _pct(value.median)
    return f"{_pct(value.median)} [{_pct(value.lo)}-{_pct(value.hi)}]"


def _spread_or_dash(value: Spread | None, digits: int = 0, scale: float = 1.0) -> str:
    return "-" if value is None else _spread(value, digits, scale)


def _cpu_text(value: Spread | None) -> str:
    return "n/a" if value is None else f"{_spread(value, 1)} ms"


def _failed_agg(a: Aggregate) -> str:
    text = f"{a.failed}/{a.rejected}"
    return f"**{text}**" if a.failed or a.rejected else text


def _ceiling_text(values: list[float] | None) -> str:
    if not values:
        return "n/a"
    return _spread_pct(Spread.of(list(values)))


def how_to_read() -> list[str]:
    return [
        "## How to read the tables",
        "",
        "Every figure is the median over the contender's runs, with their range `[min-max]` "
        "when they differ (runs: how many repetitions, each with its own seed, so its own "
        "sample of the workload, and a fresh fleet). TTFT and TPOT in wall-clock ms, e2e in "
        "wall-clock s, at the time scale stated with each workload (the backends run that "
        "many times faster than the profile's hardware; multiply backend-bound times by it for "
        "the real-time equivalent). done/s and out tok/s: requests and output tokens per second "
        "of the run's active time (throughput). failed/rejected: requests, summed over the "
        "runs, that failed or never finished / refused with 429 or 503. cache hit: prompt "
        "tokens served from the backends' caches over all prompt tokens (token-weighted), from "
        "the backends' own counters. prompt tok computed: prompt tokens the backends computed "
        "(not served from a cache); vs round robin: that over llamacpp-ha round robin's on the "
        "same repetition's workload. deferred max: the most requests one backend held waiting "
        "for a slot during the run (llama-server's `llamacpp:requests_deferred` gauge, sampled "
        "every 200 ms on every backend). reorder delay / cache wait max: the longest (s) "
        "llamacpp-ha held a request back to reorder it / to wait for a cache to free up, from "
        "its own account after the run (`routing.max_reorder_delay_s` and "
        "`routing.max_cache_wait_s` of `/monitor/data`; `-`: not reported by this version; the "
        "peers have none). imbalance: the busiest backend's "
        "requests per slot over the fleet's (1.00 = exactly proportional to slots). balancer "
        "CPU/req: the balancer process tree's CPU time during the run over the requests sent.",
    ]


def workload_table(
    rows: list[Aggregate],
    ceilings: list[float] | None,
    capacity: list[float] | None,
) -> list[str]:
    lines = [
        f"Hit-rate ceilings of this workload: **{_ceiling_text(ceilings)}** with infinite caches "
        f"(every repeated prefix cached forever), **{_ceiling_text(capacity)}** with the fleet's "
        "own (an oracle router, the backends' slots and host caches, llama-server's rules).",
        "",
        "| contender | runs | TTFT p50 | p90 | p99 | e2e p99 | TPOT | done/s | out tok/s "
        "| failed/rejected | cache hit | prompt tok computed | vs round robin | deferred max "
        "| reorder delay max | cache wait max | imbalance | balancer CPU/req |",
        "|---|:-:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for a in rows:
        name = a.label
        if a.contender == "direct":
            name = "direct (no balancer; sessions pinned by the client)"
        lines.append(
            f"| {name} | {a.runs} | {_spread(a.ttft_p50_ms)} | {_spread(a.ttft_p90_ms)} | "
            f"{_spread(a.ttft_p99_ms)} | {_spread(a.e2e_p99_s, 2)} | {_spread(a.tpot_ms, 1)} | "
            f"{_spread(a.req_per_s, 2)} | {_spread(a.out_tok_per_s)} | {_failed_agg(a)} | "
            f"{_spread_pct(a.hit_rate)} | {_spread(a.prompt_tokens_computed)} | "
            f"{_spread(a.computed_vs_round_robin, 2)} | {_spread(a.requests_deferred_max)} | "
            f"{_spread_or_dash(a.max_reorder_delay_s, 2)} | "
            f"{_spread_or_dash(a.max_cache_wait_s, 2)} | {_spread(a.imbalance, 2)} | "
            f"{_cpu_text(a.balancer_cpu_ms_per_request)} |"
        )
    return lines


def _signed(value: Spread | None, digits: int = 2) -> str:
    """An added figure with its sign and unit: ``+0.66 [+0.52-+0.80] ms``."""
    if value is None:
        return "n/a"

    def one(v: float) -> str:
        return f"{v:+.{digits}f}"

    if value.n < 2 or one(value.lo) == one(value.hi):
        return f"{one(value.median)} ms"
    return f"{one(value.median)} [{one(value.lo)}-{one(value.hi)}] ms"


def _unit(value: Spread | None, digits: int, unit: str) -> str:
    return "n/a" if value is None else f"{_spread(value, digits)} {unit}"


def carried_text(row: OverheadRow, tested: int) -> str:
    """The most streams relayed within the limit, median [range], and why it stops there."""
    if row.carried is None:
        return f"< {tested}" if tested else "n/a"
    text = _spread(row.carried)
    if row.contender == "direct":
        return f"{text} (the load generator alone)"
    reasons = set(row.carried_why)
    if reasons == {"max"}:
        return f">= {text} (max tested)"
    if "generator" in reasons:
        return f">= {text} (load generator limit)"
    return text


def overhead_table(
    over: list[OverheadResult], labels: dict[str, str], context: dict[str, Any] | None = None
) -> list[str]:
    context = context or {}
    rows = overhead_rows(over, labels)
    plan = context.get("overhead_plan") or {}
    reps = context.get("overhead_reps", max((r.reps for r in rows), default=1))
    high = plan.get("high_concurrency", 64)
    lines = [
        f"Each figure: the median over {reps} repetition(s), with their range `[min-max]` when "
        "they differ. Added TTFT is taken against direct's in the same repetition.",
        "",
        "| contender | reps | added TTFT p50, idle | p99, idle "
        f"| added TTFT p50, {high} streams open | p99 "
        "| CPU per request (non-streamed) | CPU per one-token stream | CPU per chunk "
        "| RSS idle | RSS per open stream | streams opened together "
        f"| streams relayed with p99 added delay <= {RELAY_LIMIT_MS:g} ms | failed |",
        "|---|:-:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    tested = min((n for o in over for n in o.relay_ms), default=0)
    for row in rows:
        if row.contender == "direct":
            ttfts = [
                f"{_unit(v, 2, 'ms')} (abs.)"
                for v in (
                    row.ttft_low_p50_ms,
                    row.ttft_low_p99_ms,
                    row.ttft_high_p50_ms,
                    row.ttft_high_p99_ms,
                )
            ]
        else:
            ttfts = [
                _signed(v)
                for v in (
                    row.ttft_low_p50_ms,
                    row.ttft_low_p99_ms,
                    row.ttft_high_p50_ms,
                    row.ttft_high_p99_ms,
                )
            ]
        lines.append(
            f"| {row.label} | {row.reps} | {' | '.join(ttfts)} "
            f"| {_unit(row.cpu_ms_per_request, 3, 'ms')} "
            f"| {_unit(row.cpu_ms_per_stream1, 3, 'ms')} "
            f"| {_unit(row.cpu_us_per_chunk, 1, 'µs')} "
            f"| {_unit(row.rss_idle_mb, 1, 'MiB')} | {_unit(row.rss_kb_per_stream, 1, 'KiB')} "
            f"| {_spread_or_dash(row.open_streams)} | {carried_text(row, tested)} "
            f"| {row.failures} |"
        )
    lines.append("")
    directs = [o for o in over if o.contender == "direct"]
    if directs:
        base = directs[0]
        relay = ", ".join(
            f"{n} streams: p50 {_f(v.get('p50'), 2)} / p99 {_f(v.get('p99'), 2)} ms"
            for n, v in base.relay_ms.items()
        )
        lines.append(f"Direct relay delay (ticker to client, no balancer, rep 0): {relay}.")
        lines.append("")
        lines.append(
            "The load generator and the stand-in backend share one core: on their own (direct) "
            f"they keep p99 under {RELAY_LIMIT_MS:g} ms up to the count in direct's row, so no "
            "balancer can be shown to carry more here. A step over the limit is run twice and "
            "the better p99 kept, so that one hiccup of the shared machine does not end a ramp."
        )
        lines.append("")
    lines.append(
        "Relay delay p99 per chunk, by concurrent streams (ms, the contender's own; median over "
        "the repetitions that reached the step; n/a: not reached, or never all open together):"
    )
    lines.append("")
    ramp = sorted({n for o in over for n in o.relay_ms})
    lines.append("| contender | " + " | ".join(str(n) for n in ramp) + " |")
    lines.append("|---|" + "--:|" * len(ramp))
    for row in rows:
        mine = [o for o in over if o.contender == row.contender]
        cells = []
        for n in ramp:
            spread = Spread.of([o.relay_ms[n].get("p99") for o in mine if n in o.relay_ms])
            cells.append(_spread(spread, 1))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def generator_text(context: dict[str, Any]) -> str:
    """What drove the many-stream phases: processes x streams each."""
    plan = context.get("overhead_plan") or {}
    clients = plan.get("clients", 1)
    most = max([*plan.get("ramp", []), plan.get("open_streams", 0)], default=0)
    each = -(-most // clients) if clients else most
    return (
        f"Load generator of the many-stream phases (memory, relay ramp): {clients} client "
        f"process(es) x up to {each:,} streams each ({most:,} in all; `bench/streamers.py`, "
        "each its own event loop and aiohttp session), new streams at "
        f"{plan.get('start_rate', 0):,.0f}/s, a chunk every {plan.get('ramp_tick_ms', 0):g} ms "
        f"per stream; the other phases: one aiohttp session of the harness."
    )


def overhead_section(
    over: list[OverheadResult], labels: dict[str, str], context: dict[str, Any]
) -> list[str]:
    plan = context.get("overhead_plan") or {}
    high, tick = plan.get("high_concurrency", 64), plan.get("high_tick_ms", 30.0)
    lines = [
        "## Overhead (one backend, nothing queued, no time scale)",
        "",
        "Added time to first token is the contender's minus direct's at the same percentile, in "
        "the same repetition; idle = sequential one-token streams on an idle balancer "
        f"({plan.get('low_requests', 'N')} of them); {high} streams open = the same probes "
        f"sent while {high} other streams flow through it (a chunk every {tick:g} ms each, "
        f"~{high * 1000 / tick:,.0f} chunks/s). CPU per request (non-streamed): small chat "
        f"requests with `stream: false` ({plan.get('cpu_concurrency', 16)} concurrent clients "
        f"for {plan.get('cpu_requests_s', 2):g} s); CPU per one-token stream: the same with "
        f"`stream: true` ({plan.get('cpu_stream1_s', 2):g} s); CPU per chunk: "
        f"{plan.get('cpu_streams', 64)} concurrent streams of a chunk every "
        f"{plan.get('cpu_stream_tick_ms', 10):g} ms ({plan.get('cpu_streams_s', 2.5):g} s), "
        "less the one-token stream's part; all from the balancer's process tree in /proc (CPU "
        "time, not wall time). RSS per open stream: resident memory added by "
        f"{context.get('open_streams', 'N'):,} open, idle streams, read once all are open; "
        "streams opened together: how many of them were. Relay ramp: at each step, that many "
        f"streams (a chunk every {plan.get('ramp_tick_ms', 0):g} ms each) are started at "
        f"{plan.get('start_rate', 0):,.0f}/s; once all are open, the chunks written during "
        f"the next {plan.get('ramp_window_s', 1):g} s count (every stream open all along).",
        "",
        generator_text(context),
        "",
    ]
    return lines + overhead_table(over, labels, context)


def summary_table(rows: list[Aggregate], regime: dict[str, Any]) -> list[str]:
    names = [w["name"] for w in regime["workloads"]]
    lines = [
        "Medians over the runs: time to first token p50 / p99 (ms, wall clock) · prompt cache "
        "hit rate · prompt tokens computed over round robin's; **bold** marks contenders with "
        "failed or rejected requests; (1) marks contenders that ran once.",
        "",
        "| contender | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "--:|" * len(names),
    ]
    contenders = list(dict.fromkeys(a.contender for a in rows))
    for key in contenders:
        cells = []
        label = next(a.label for a in rows if a.contender == key)
        once = False
        for name in names:
            a = next((x for x in rows if x.contender == key and x.workload == name), None)
            if a is None:
                cells.append("n/a")
                continue
            once = once or a.runs == 1
            ratio = a.computed_vs_round_robin
            cell = (
                f"{_f(_median(a.ttft_p50_ms))} / {_f(_median(a.ttft_p99_ms))} · "
                f"{_pct(_median(a.hit_rate))} · {_f(_median(ratio), 2)}x"
                if ratio is not None
                else f"{_f(_median(a.ttft_p50_ms))} / {_f(_median(a.ttft_p99_ms))} · "
                f"{_pct(_median(a.hit_rate))}"
            )
            cells.append(f"**{cell}**" if a.failed or a.rejected else cell)
        if once and regime.get("reps", 1) > 1:
            label += " (1)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ceilings = [_ceiling_text(regime["ceilings"].get(n)) for n in names]
    lines.append("| *hit-rate ceiling, infinite caches* | " + " | ".join(ceilings) + " |")
    capacity = regime.get("capacity_ceilings") or {}
    if capacity:
        cells = [_ceiling_text(capacity.get(n)) for n in names]
        lines.append("| *hit-rate ceiling, the fleet's caches* | " + " | ".join(cells) + " |")
    requests = [_requests_text(w["requests"]) for w in regime["workloads"]]
    lines.append("| *requests per run* | " + " | ".join(requests) + " |")
    scales = [f"{w.get('time_scale', regime['time_scale']):g}" for w in regime["workloads"]]
    lines.append("| *time scale* | " + " | ".join(scales) + " |")
    return lines


def _median(value: Spread | None) -> float | None:
    return None if value is None else value.median


def _requests_text(counts: list[int] | int) -> str:
    if isinstance(counts, int):
        return str(counts)
    if len(set(counts)) == 1:
        return str(counts[0])
    return f"{min(counts)}-{max(counts)}"


def goal_table(rows: list[Aggregate], regime: dict[str, Any], default: str) -> list[str]:
    verdicts = goal_check(rows, default, _capacity_medians(regime))
    if not verdicts:
        return [f"No run of the default policy (`{default}`) in this regime."]
    lines = [
        f"The default llamacpp-ha policy (`{default}`) against the goals of issue 13, medians "
        "against medians in this regime; each cell is yes/no with its figures; `-` where the "
        "goal does not apply or a contender it compares with did not run.",
        "",
        "| workload | " + " | ".join(title for _, title in GOALS) + " |",
        "|---|" + ":-:|" * len(GOALS),
    ]
    for name, cells in verdicts.items():
        lines.append(f"| `{name}` | " + " | ".join(cells[key].cell() for key, _ in GOALS) + " |")
    lines += [
        "",
        "Throughput is output tokens per second. The hit-rate ceiling goal applies where the "
        f"fleet's capacity ceiling is at least {MEANINGFUL_CEILING:.0%}; prompt tokens computed "
        "against round robin (llamacpp-ha's) on the multi-turn and trace workloads (chat, "
        'Mooncake); "within 3% of least busy" means no more than 3% above '
        "`ha-least-busy`'s, on the random workload.",
    ]
    return lines


CEILINGS = """\
Two ceilings, both computed offline from the workload with the simulator's own tokenizer and
replies (`bench/ceiling.py`). *Infinite caches*: one backend that keeps every prompt and reply
forever. *The fleet's caches*: an event-by-event replay of the workload on this fleet's backends,
with their slots and host caches (`--cache-ram`, the profile's bytes per token) kept by
llama-server's rules as the simulator models them (held to the real binary by
`tests/e2e/test_e2e_cache_fidelity.py`); the best of three oracle routers (each request to the
free backend whose caches would serve most of it; every prefix group pinned to one backend;
every session pinned, as `direct`) over service speeds from instant to the profile's own. The
gap between the two ceilings is what the fleet's caches cannot hold and what llama-server's
rules drop (a slot reused for a similar prompt is cut without a save when it keeps half its
tokens), whatever the routing and the timing. The rest, between a contender and the second
ceiling, is routing and timing: above all a conversation's next request arriving while its
state is still being computed in a busy slot, which a router can only avoid by holding the
request back. It is an oracle's best, not a proof.
"""


CONFIGURATIONS = """\
## How each contender was configured

- **direct**: no balancer. In the workloads, the client pins each session (a Mooncake
  conversation, a single request) to one backend by a hash of its id, spread in proportion to
  slots: a perfectly sticky balancer with no hop, no queue and no view of load. In the overhead
  section, the one backend.
- **llamacpp-ha**: its defaults (poll interval 1 s, queue timeout 60 s) with each routing
  policy it offers: HA_POLICIES (the first is its default).
- **nginx**: one worker, `upstream` with `weight` = slots per server (round robin, and
  `least_conn`, which divides active connections by weight), `keepalive 256`,
  `proxy_http_version 1.1`, `proxy_buffering off`, `proxy_request_buffering off`. Open-source
  nginx has no upstream queue, so no `max_conns`.
- **HAProxy**: `nbthread 1`, `balance leastconn`, `maxconn` = slots per server, `timeout queue
  60s`, `option http-no-delay`. Without that last option HAProxy holds each SSE chunk until
  the next one arrives (about 100 ms added per chunk at 10 chunks/s, measured while setting
  this up), which no one streaming tokens would accept.
- **SGLang router**: `python -m sglang_router.launch_router --policy cache_aware` and
  `--policy round_robin`, otherwise its defaults. With the default `balance_abs_threshold` of
  64, a 12-slot fleet never counts as imbalanced, so `cache_aware` always routes by prefix.
  Seen with strace: it writes a response's headers and first chunks in separate small segments
  without `TCP_NODELAY`, so on a kept-alive client connection the first chunks can wait for
  the client's delayed ACK (about 40 ms).
- **LiteLLM proxy**: 1.106.12, the newest release tried whose `[proxy]` extra installs from
  PyPI here (1.108.14 and 1.110.2 pin `litellm-proxy-extras`/`litellm-proxy` releases the index
  does not serve; the index offers no 1.107.0). One worker, `routing_strategy: least-busy`, one
  deployment per backend, a random master key (it refuses to start without one). It strips
  llama-server's `timings` from the stream; the backends' counters are used instead.
"""


CAVEATS = """\
## What this machine cannot show, and how each figure was isolated

- **Two cores for everything.** The simulated backends, the load generator and the balancer
  share one machine with 2 cores. Each balancer is pinned (`taskset`) to a core of its own; the
  simulated fleet and the load generator share the other. So a balancer is never starved by
  the load it serves, but the backends and the client compete with each other: the same for
  every contender, so comparisons hold, absolute latencies are a little pessimistic.
- **No GPU, simulated backends.** The backends are `llamacpp-ha-sim`: llama-server's slots,
  its slot choice, its prompt caches (each slot's KV and the host cache of `--cache-ram`, with
  the rules of the pinned build, compared request by request with the real binary by an
  end-to-end test), continuous batching with the timing of the stated profile (prompt tokens
  dearer as the context grows, state copies to and from host memory that stall the server) and
  its API, `timings` included. The simulator does not model speculative decoding, context
  shift, SWA or recurrent models' checkpoints, or a GPU's memory beyond the KV cache; the
  results say how balancers differ on the same fleet, not how fast a GPU is.
- **Time scale.** The backends run faster than real hardware by the workload's time scale,
  so a run takes seconds instead of minutes. This multiplies the rate of streamed chunks a
  balancer relays per second by the same factor (a stress on the balancer's CPU that real
  hardware of this size would not apply), while the balancer's own per-request costs are not
  scaled: added latencies are measured in real time, in the overhead section, with no scaling
  at all. Each workload's time scale is chosen so that its run lasts 10-25 s of wall time
  with a stream of a few thousand chunks a second at most, the same order in both regimes
  (the 70B backends decode 4.5x slower than the 8B ones, so the prefill-bound regime's time
  scales are larger). A balancer's own few milliseconds weigh more in a run of a larger time
  scale; compare contenders within a workload, not workloads with each other.
- **Where each figure comes from.** Latencies and token counts: the client, per request
  (first token = first streamed chunk carrying text). Cache hits, prompt tokens computed and
  requests per backend: the backends' own counters (`/metrics`, task ids in `/slots`) read
  before and after each run, the same source for every contender (LiteLLM strips llama-server's
  `timings` from the stream). Balancer CPU: `utime + stime` from `/proc/<pid>/stat` of the
  balancer's whole process tree (nginx's worker, LiteLLM's uvicorn) before and after; memory:
  its resident set from `/proc/<pid>/statm`. Overhead figures come from a separate stand-in
  backend that stamps every chunk with `CLOCK_MONOTONIC` when it writes it and has a free slot
  for every stream the section opens at once (2,112: one backend with that many slots, which a
  balancer that looks at every slot of a backend per request pays for), so nothing queues and
  the only difference from `direct` is the balancer.
- **Cold start every run.** A new fleet is started for every (regime, workload, repetition,
  contender) run, so no contender inherits another's warm caches, and the balancer is started
  fresh in front of it.
- **Repetitions, and what they do not remove.** Every routing contender runs each workload
  several times, each repetition with its own seed (its own sample of sessions, prompts and
  arrival times) and a fresh fleet; a figure is the median of the runs, with their range. The
  range is the spread of the workload's samples and of the scheduling noise of a shared
  2-core machine together; with three runs it is a range, not a confidence interval. p99 of a
  run of ~200 requests rests on its two or three slowest requests and still moves by tens of
  percent between runs; p50 and p90 are steadier, except at saturation. The peers that do not
  route (direct, nginx, SGLang's round robin, LiteLLM) ran once, decode-bound only.
- **Turns wait for replies.** Sessions arrive open-loop (Poisson), but a session's next turn
  is sent a think time after the previous reply, as a person would; a slow balancer delays a
  session's later turns, which lowers its offered load a little. Single-request workloads
  (random, Mooncake, bursts) are fully open-loop.
"""


def rewrite(out: Path) -> None:
    """Write RESULTS.md again from ``results.json`` (after a change to this module's text)."""
    data = json.loads((out / "results.json").read_text())
    results = [RunResult(**r) for r in data["runs"]]
    over = []
    for o in data["overhead"]:
        o["relay_ms"] = {int(n): v for n, v in o["relay_ms"].items()}
        if "cpu_ms_per_stream1" not in o:  # before the non-streamed phase: one-token streams
            o["cpu_ms_per_stream1"] = o.pop("cpu_ms_per_request", None)
        over.append(OverheadResult(**o))
    write(out, results, over, data["context"])


def regime_section(
    rows: list[Aggregate], regime: dict[str, Any], default: str, plots: list[str]
) -> list[str]:
    name = regime["name"]
    lines = [
        "",
        f"## Regime `{name}`: {regime['title']}",
        "",
        f"{regime['description']}.",
        "",
        f"- Fleet: {regime['fleet']} (`llamacpp-ha-sim`, one fresh fleet per run)",
        f"- Repetitions: {regime['reps']} per routing contender (seeds {regime.get('seeds', '')})"
        + (
            "; the other contenders once"
            if regime.get("peers_once")
            else "; routing contenders only"
        ),
        "- Workloads (requests per run, by repetition; wall time of the schedule):",
    ]
    for w in regime["workloads"]:
        counts = w["requests"] if isinstance(w["requests"], list) else [w["requests"]]
        scale = w.get("time_scale", regime["time_scale"])
        lines.append(
            f"  - `{w['name']}`: {', '.join(str(c) for c in counts)} requests, "
            f"{w.get('span_s', 0):.0f} model s at time scale {scale:g} = "
            f"{w.get('wall_s', 0):.1f} s of wall time"
        )
    if not rows:
        return lines
    lines += ["", f"### Summary (`{name}`)", ""]
    lines += summary_table(rows, regime)
    for w in regime["workloads"]:
        mine = [a for a in rows if a.workload == w["name"]]
        lines += [
            "",
            f"### {w['title']} (`{name}` / `{w['name']}`)",
            "",
            w["description"] + " (the first repetition's sample). Time scale "
            f"{w.get('time_scale', regime['time_scale']):g}.",
            "",
        ]
        lines += workload_table(
            mine,
            regime["ceilings"].get(w["name"]),
            (regime.get("capacity_ceilings") or {}).get(w["name"]),
        )
    lines += ["", f"### Goal check (`{name}`)", ""]
    lines += goal_table(rows, regime, default)
    mine_plots = [p for p in plots if p.startswith(f"{name}-")]
    if mine_plots:
        lines += ["", *(f"![{p}]({p})" for p in mine_plots)]
    return lines


def write(
    out: Path, results: list[RunResult], over: list[OverheadResult], context: dict[str, Any]
) -> None:
    labels: dict[str, str] = context["labels"]
    rows = aggregate(results, labels)
    default: str = context.get("default", "")
    goals = {
        regime["name"]: {
            workload: {key: asdict(v) for key, v in cells.items()}
            for workload, cells in goal_check(
                [a for a in rows if a.regime == regime["name"]],
                default,
                _capacity_medians(regime),
            ).items()
        }
        for regime in context["regimes"]
    }
    (out / "results.json").write_text(
        json.dumps(
            {
                "context": context,
                "aggregates": [a.to_json() for a in rows],
                "goal_check": goals,
                "runs": [r.to_json() for r in results],
                "overhead": [o.to_json() for o in over],
                "overhead_aggregates": [r.to_json() for r in overhead_rows(over, labels)],
            },
            indent=1,
            default=str,
        )
    )
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    regimes = context["regimes"]
    lines = [
        "# llamacpp-ha benchmark results",
        "",
        f"Generated by `{context['make_target']}` on {now} in "
        f"{context['runtime_s'] / 60:.1f} minutes. Do not edit: rerun the benchmark.",
        "",
        "## Setup",
        "",
        f"- Command: `{context['command']}`",
        f"- Seed: {context['seed']} (repetition r uses seed {context['seed']} + r); "
        f"repetitions: {context.get('reps', 1)} per routing contender (every llamacpp-ha "
        "policy, SGLang's cache_aware router, HAProxy)",
        "- Regimes: " + "; ".join(f"`{r['name']}` (time scale {_scales_text(r)})" for r in regimes),
        f"- Machine: {context['machine']['cpu']}, {context['machine']['memory']}, "
        f"{context['machine']['os']}, Python {context['machine']['python']}",
        f"- CPU pinning: fleet and load generator on CPU {context['cpus']['fleet_and_client']}, "
        f"balancer on CPU {context['cpus']['balancer']}",
        f"- Other processes on the machine (not this benchmark) used on average "
        f"{context['background_cores']:.2f} cores during the run",
        "",
        "| contender | version | runs | status |",
        "|---|---|---|---|",
    ]
    routing = set(context.get("routing", []))
    reps = context.get("reps", 1)
    for key, label in labels.items():
        reason = context["unavailable"].get(key)
        status = f"unavailable: {reason}" if reason else "ran"
        runs = f"{reps} per workload and regime" if key in routing else "1, decode-bound only"
        if reps == 1 and key in routing:
            runs = "1 per workload and regime"
        lines.append(f"| {label} | {context['versions'].get(key, '-')} | {runs} | {status} |")
    if context["failures"]:
        lines += ["", "Runs that did not complete:", ""]
        lines += [f"- {k}: {' '.join(v.split())[:300]}" for k, v in context["failures"].items()]
    plots = context.get("plots") or []
    if results:
        lines += ["", *how_to_read()]
    for regime in regimes:
        mine = [a for a in rows if a.regime == regime["name"]]
        lines += regime_section(mine, regime, default, plots)
    if results:
        lines += ["", "## The two ceilings", "", CEILINGS]
    if over:
        lines += ["", *overhead_section(over, labels, context)]
    if context.get("decision"):
        decided = [DecisionRun(**d) for d in context["decision"]]
        lines += ["", *decision_section(decided, context.get("decision_plan") or {})]
    others = [p for p in plots if not any(p.startswith(f"{r['name']}-") for r in regimes)]
    if others:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in others]
    policies = ", ".join(f"`--routing {p}`" for p in context.get("ha_policies", [])) or "none"
    lines += ["", CONFIGURATIONS.replace("HA_POLICIES", policies), CAVEATS]
    lines += ["", "Raw numbers of every run: `results.json` beside this file."]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def _scales_text(regime: dict[str, Any]) -> str:
    """``32; mooncake 72, random 48``: the regime's time scale and the workloads' own."""
    default = regime["time_scale"]
    own = [
        f"{w['name']} {w['time_scale']:g}"
        for w in regime["workloads"]
        if w.get("time_scale", default) != default
    ]
    return f"{default:g}" + (f"; {', '.join(own)}" if own else "")


def _capacity_medians(regime: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, values in (regime.get("capacity_ceilings") or {}).items():
        spread = Spread.of(list(values))
        out[name] = None if spread is None else spread.median
    return out
