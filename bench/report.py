"""``RESULTS.md`` and ``results.json``: the tables, the setup that produced them, the caveats."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from bench.metrics import RunResult
from bench.overhead import RELAY_LIMIT_MS, OverheadResult, carried_streams, generator_limit


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
        f"ttft low p50 {_f(o.ttft_low_ms.get('p50'), 2)} ms, high p50 "
        f"{_f(o.ttft_high_ms.get('p50'), 2)} ms, cpu {_f(o.cpu_ms_per_request, 3)} ms/req "
        f"{_f(o.cpu_us_per_chunk, 1)} us/chunk, {_f(o.rss_kb_per_stream, 1)} KiB/stream, "
        f"relay p99 by streams {relay}"
    )


def _cpu_per_request(r: RunResult) -> str:
    if r.balancer_cpu_s is None or not r.requests:
        return "n/a"
    return f"{r.balancer_cpu_s / r.requests * 1000:.1f} ms"


def _failed(r: RunResult) -> str:
    text = f"{r.failed}/{r.rejected}"
    return f"**{text}**" if r.failed or r.rejected else text


def workload_table(
    results: list[RunResult],
    ceiling: float,
    capacity: float | None,
    labels: dict[str, str],
    time_scale: float,
) -> list[str]:
    direct = next((r for r in results if r.contender == "direct"), None)
    lines = [
        f"Hit-rate ceilings of this workload: **{_pct(ceiling)}** with infinite caches (every "
        f"repeated prefix cached forever), **{_pct(capacity)}** with the fleet's own (an "
        "oracle router, the backends' slots and host caches, llama-server's rules).",
        "",
        "| contender | TTFT p50 | p90 | p99 | e2e p50 | e2e p99 | TPOT | done/s | out tok/s "
        "| failed/rejected | cache hit | prompt tok computed | imbalance | balancer CPU/req |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|",
    ]
    for r in results:
        name = labels.get(r.contender, r.contender)
        if r.contender == "direct":
            name = "direct (no balancer; sessions pinned by the client)"
        lines.append(
            f"| {name} | {_f(r.ttft_ms['p50'])} | {_f(r.ttft_ms['p90'])} | "
            f"{_f(r.ttft_ms['p99'])} | {_f(r.e2e_s['p50'], 2)} | {_f(r.e2e_s['p99'], 2)} | "
            f"{_f(r.tpot_ms, 1)} | {_f(r.req_per_s, 2)} | {_f(r.out_tok_per_s)} | "
            f"{_failed(r)} | {_pct(r.hit_rate)} | {r.prompt_tokens_computed:,} | "
            f"{_f(r.imbalance, 2)} | {_cpu_per_request(r)} |"
        )
    lines.append("")
    lines.append(
        f"TTFT and TPOT in wall-clock ms, e2e in wall-clock s, at time scale {time_scale:g} "
        f"(the backends run {time_scale:g}x faster than the profile's hardware; multiply "
        "backend-bound times by it for the real-time equivalent). failed/rejected: requests "
        "that failed or never finished / refused with 429 or 503. cache hit: prompt tokens "
        "served from the backends' caches over all prompt tokens, from the backends' own "
        "counters. imbalance: the busiest backend's requests per slot over the fleet's "
        "(1.00 = exactly proportional to slots). balancer CPU/req: the balancer process "
        "tree's CPU time during the run over the requests sent."
    )
    if direct is not None:
        lines.append("")
    return lines


def overhead_table(over: list[OverheadResult], labels: dict[str, str]) -> list[str]:
    base = next((o for o in over if o.contender == "direct"), None)
    lines = [
        "| contender | added TTFT p50, idle | p99 | added TTFT p50, 64 streams open | p99 "
        "| CPU per request | CPU per chunk | RSS idle | RSS per open stream "
        f"| streams relayed with p99 added delay <= {RELAY_LIMIT_MS:g} ms | failed |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for o in over:

        def added(mine: dict[str, float | None], theirs: dict[str, float | None], q: str) -> str:
            a, b = mine.get(q), theirs.get(q)
            if base is None or a is None or b is None:
                return "n/a"
            return f"{float(a) - float(b):+.2f} ms"

        if o.contender == "direct":
            low50 = f"{_f(o.ttft_low_ms.get('p50'), 2)} ms (abs.)"
            low99 = f"{_f(o.ttft_low_ms.get('p99'), 2)} ms (abs.)"
            high50 = f"{_f(o.ttft_high_ms.get('p50'), 2)} ms (abs.)"
            high99 = f"{_f(o.ttft_high_ms.get('p99'), 2)} ms (abs.)"
            carried = f"{generator_limit(o.relay_ms)} (the load generator alone)"
        else:
            assert base is not None
            low50 = added(o.ttft_low_ms, base.ttft_low_ms, "p50")
            low99 = added(o.ttft_low_ms, base.ttft_low_ms, "p99")
            high50 = added(o.ttft_high_ms, base.ttft_high_ms, "p50")
            high99 = added(o.ttft_high_ms, base.ttft_high_ms, "p99")
            n, why = carried_streams(o, base.relay_ms)
            if n is None:
                carried = f"< {min(o.relay_ms, default=0)}"
            elif why == "limit":
                carried = str(n)
            else:
                carried = (
                    f">= {n} ({'load generator limit' if why == 'generator' else 'max tested'})"
                )
        lines.append(
            f"| {labels.get(o.contender, o.contender)} | {low50} | {low99} | {high50} | {high99} "
            f"| {_f(o.cpu_ms_per_request, 3)} ms | {_f(o.cpu_us_per_chunk, 1)} µs "
            f"| {_f(o.rss_idle_mb, 1)} MiB | {_f(o.rss_kb_per_stream, 1)} KiB | {carried} "
            f"| {o.failures} |"
        )
    lines.append("")
    if base is not None:
        relay = ", ".join(
            f"{n} streams: p50 {_f(v.get('p50'), 2)} / p99 {_f(v.get('p99'), 2)} ms"
            for n, v in base.relay_ms.items()
        )
        lines.append(f"Direct relay delay (ticker to client, no balancer): {relay}.")
        limit = generator_limit(base.relay_ms)
        lines.append("")
        lines.append(
            f"The load generator and the stand-in backend share one core: on their own (direct) "
            f"they keep p99 under {RELAY_LIMIT_MS:g} ms up to {limit} of the streams tested, so "
            "no balancer can be shown to carry more here. A step over the limit is run twice "
            "and the better p99 kept, so that one hiccup of the shared machine does not end a "
            "ramp."
        )
        lines.append("")
    lines.append("Relay delay p99 per chunk, by concurrent streams (ms, the contender's own):")
    lines.append("")
    ramp = sorted({n for o in over for n in o.relay_ms})
    lines.append("| contender | " + " | ".join(str(n) for n in ramp) + " |")
    lines.append("|---|" + "--:|" * len(ramp))
    for o in over:
        cells = [_f(o.relay_ms[n].get("p99"), 1) if n in o.relay_ms else "n/a" for n in ramp]
        lines.append(f"| {labels.get(o.contender, o.contender)} | " + " | ".join(cells) + " |")
    return lines


def summary_table(
    results: list[RunResult], context: dict[str, Any], labels: dict[str, str]
) -> list[str]:
    names = [w["name"] for w in context["workloads"]]
    lines = [
        "Time to first token p50 / p99 (ms, wall clock) and prompt cache hit rate; **bold** "
        "marks runs with failed or rejected requests.",
        "",
        "| contender | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "--:|" * len(names),
    ]
    for key, label in labels.items():
        cells = []
        for name in names:
            r = next((x for x in results if x.contender == key and x.workload == name), None)
            if r is None:
                cells.append("n/a")
                continue
            cell = f"{_f(r.ttft_ms['p50'])} / {_f(r.ttft_ms['p99'])} · {_pct(r.hit_rate)}"
            cells.append(f"**{cell}**" if r.failed or r.rejected else cell)
        if any(c != "n/a" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ceilings = [f"{_pct(context['ceilings'][n])}" for n in names]
    lines.append("| *hit-rate ceiling, infinite caches* | " + " | ".join(ceilings) + " |")
    capacity = context.get("capacity_ceilings") or {}
    if capacity:
        cells = [_pct(capacity.get(n)) for n in names]
        lines.append("| *hit-rate ceiling, the fleet's caches* | " + " | ".join(cells) + " |")
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
- **Time scale.** The backends run faster than real hardware by the time scale, so a run takes
  seconds instead of minutes. This multiplies the rate of streamed chunks a balancer relays
  per second by the same factor (a stress on the balancer's CPU that real hardware of this
  size would not apply), while the balancer's own per-request costs are not scaled: added
  latencies are measured in real time, in the overhead section, with no scaling at all.
- **Where each figure comes from.** Latencies and token counts: the client, per request
  (first token = first streamed chunk carrying text). Cache hits, prompt tokens computed and
  requests per backend: the backends' own counters (`/metrics`, task ids in `/slots`) read
  before and after each run, the same source for every contender (LiteLLM strips llama-server's
  `timings` from the stream). Balancer CPU: `utime + stime` from `/proc/<pid>/stat` of the
  balancer's whole process tree (nginx's worker, LiteLLM's uvicorn) before and after; memory:
  its resident set from `/proc/<pid>/statm`. Overhead figures come from a separate stand-in
  backend that stamps every chunk with `CLOCK_MONOTONIC` when it writes it and has 1,024 free
  slots, so nothing queues and the only difference from `direct` is the balancer.
- **Cold start every run.** A new fleet is started for every (workload, contender) pair, so no
  contender inherits another's warm caches, and the balancer is started fresh in front of it.
- **Small samples.** Each run is a few hundred requests at most: p99 is close to the maximum
  and moves by tens of percent between runs; p50 and p90 are steadier, except at saturation,
  where p50 too moved by 10-20% between full runs while this harness was built, and a policy
  that piles load on one backend (SGLang's `cache_aware`) by a factor of 3. The seed fixes the
  workload, not the scheduling noise of a shared machine: compare contenders within a run.
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
        over.append(OverheadResult(**o))
    write(out, results, over, data["context"])


def write(
    out: Path, results: list[RunResult], over: list[OverheadResult], context: dict[str, Any]
) -> None:
    labels: dict[str, str] = context["labels"]
    (out / "results.json").write_text(
        json.dumps(
            {
                "context": context,
                "runs": [r.to_json() for r in results],
                "overhead": [o.to_json() for o in over],
            },
            indent=1,
            default=str,
        )
    )
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# llamacpp-ha benchmark results",
        "",
        f"Generated by `{context['make_target']}` on {now} in "
        f"{context['runtime_s'] / 60:.1f} minutes. Do not edit: rerun the benchmark.",
        "",
        "## Setup",
        "",
        f"- Command: `{context['command']}`",
        f"- Seed: {context['seed']}; time scale: {context['time_scale']:g}",
        f"- Fleet: {context['fleet']} (`llamacpp-ha-sim`, one fresh fleet per run)",
        f"- Machine: {context['machine']['cpu']}, {context['machine']['memory']}, "
        f"{context['machine']['os']}, Python {context['machine']['python']}",
        f"- CPU pinning: fleet and load generator on CPU {context['cpus']['fleet_and_client']}, "
        f"balancer on CPU {context['cpus']['balancer']}",
        f"- Other processes on the machine (not this benchmark) used on average "
        f"{context['background_cores']:.2f} cores during the run",
        "",
        "| contender | version | status |",
        "|---|---|---|",
    ]
    for key, label in labels.items():
        reason = context["unavailable"].get(key)
        status = f"unavailable: {reason}" if reason else "ran"
        lines.append(f"| {label} | {context['versions'].get(key, '-')} | {status} |")
    if context["failures"]:
        lines += ["", "Runs that did not complete:", ""]
        lines += [f"- {k}: {' '.join(v.split())[:300]}" for k, v in context["failures"].items()]
    if results:
        lines += ["", "## Summary", ""]
        lines += summary_table(results, context, labels)
        lines += ["", CEILINGS]
    for w in context["workloads"]:
        mine = [r for r in results if r.workload == w["name"]]
        lines += ["", f"## {w['title']} (`{w['name']}`)", "", w["description"] + ".", ""]
        lines += workload_table(
            mine,
            context["ceilings"][w["name"]],
            (context.get("capacity_ceilings") or {}).get(w["name"]),
            labels,
            context["time_scale"],
        )
    if over:
        lines += [
            "",
            "## Overhead (one backend, nothing queued, no time scale)",
            "",
            "Added time to first token is the contender's minus direct's at the same percentile; "
            "1 stream = sequential requests on an idle balancer; 64 streams = the same probes "
            "sent while 64 other streams flow through it (a chunk every 30 ms each, ~2,100 "
            "chunks/s). CPU per request "
            "is measured with one-token replies (16 concurrent clients for 2 s); CPU per chunk "
            "with 64 concurrent streams of a chunk every 10 ms (3 s), less the per-request part; "
            "both from the balancer's process tree in /proc. RSS per open stream: resident "
            "memory added by "
            f"{context.get('open_streams', 'N')} open, mostly idle streams.",
            "",
        ]
        lines += overhead_table(over, labels)
    plots = context.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
    policies = ", ".join(f"`--routing {p}`" for p in context.get("ha_policies", [])) or "none"
    lines += ["", CONFIGURATIONS.replace("HA_POLICIES", policies), CAVEATS]
    lines += ["", "Raw numbers of every run: `results.json` beside this file."]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
