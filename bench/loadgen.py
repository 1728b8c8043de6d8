"""Open-loop replay of a workload against one contender.

Each session starts at its scheduled time whatever happened before it, so a slow balancer
cannot slow the arrivals down and hide its queue; within a session a turn waits for the reply
it has to quote. A run ends when everything is answered or at its deadline, when whatever is
still open is cancelled and counted as unfinished.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from bench.client import Outcome, new_session, stream_request
from bench.contenders import Running
from bench.workloads import Session, Workload

MODEL = "sim-model"


async def _run_session(
    http: aiohttp.ClientSession,
    running: Running,
    session: Session,
    start_at: float,
    time_scale: float,
    outcomes: list[Outcome],
) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    base = running.url_for(session.key)
    messages: list[dict[str, str]] = []
    if session.system is not None:
        messages.append({"role": "system", "content": session.system})
    for i, turn in enumerate(session.turns):
        if turn.think_s:
            await asyncio.sleep(turn.think_s / time_scale)
        body: dict[str, Any] = {"model": MODEL, "max_tokens": turn.max_tokens}
        if session.completion:
            url = base + "/v1/completions"
            body["prompt"] = turn.content
        else:
            url = base + "/v1/chat/completions"
            messages.append({"role": "user", "content": turn.content})
            body["messages"] = list(messages)
        outcome = Outcome(tag=f"{session.key}/{i}", scheduled_at=time.monotonic())
        outcomes.append(outcome)
        await stream_request(http, url, body, outcome, headers=running.headers)
        if not outcome.ok:
            # The next turn would quote a reply that never came: the rest of the session is
            # lost, and counted as failed with the reason.
            for j in range(i + 1, len(session.turns)):
                lost = Outcome(tag=f"{session.key}/{j}", scheduled_at=time.monotonic())
                lost.error = "not sent: an earlier turn of the session failed"
                outcomes.append(lost)
            return
        if not session.completion:
            messages.append({"role": "assistant", "content": outcome.text})


async def replay(
    running: Running, workload: Workload, time_scale: float, deadline_s: float
) -> tuple[list[Outcome], float]:
    """Run ``workload``; return the outcomes and the wall time it took."""
    outcomes: list[Outcome] = []
    async with new_session() as http:
        t0 = time.monotonic() + 0.1
        tasks = [
            asyncio.create_task(
                _run_session(http, running, s, t0 + s.start_s / time_scale, time_scale, outcomes)
            )
            for s in workload.sessions
        ]
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - t0
    # Sessions cancelled before sending a turn leave no outcome for it: count those too.
    sent = {o.tag for o in outcomes}
    for s in workload.sessions:
        for i in range(len(s.turns)):
            if f"{s.key}/{i}" not in sent:
                lost = Outcome(tag=f"{s.key}/{i}", scheduled_at=t0)
                lost.error = "unfinished: not sent before the end of the run"
                outcomes.append(lost)
    for o in outcomes:
        if o.error is None and o.done_at is None:
            o.error = "unfinished: cancelled at the end of the run"
    return outcomes, wall
