"""The prompt-cache hit rate no balancer can beat on a workload.

The ceiling assumes one backend with unbounded cache that keeps every prompt and every reply
forever: a request then hits for the longest prefix it shares with anything sent before it. It is
computed offline with the simulator's own tokenizer, chat template and reply generator (replies
are a pure function of the prompt there), so it is exact for the simulated fleet.
"""

from __future__ import annotations

import bisect

from bench.workloads import Workload
from llamacpp_sim.generator import reply_pieces
from llamacpp_sim.prompt_cache import common_prefix_len
from llamacpp_sim.template import render_chat
from llamacpp_sim.tokenizer import Tokenizer

# Model seconds a turn is assumed to take when ordering requests of overlapping sessions; only
# the order of first occurrences matters, so an estimate is enough.
_TURN_ESTIMATE_S = 2.0


def sequences(workload: Workload) -> list[tuple[float, list[int], list[int]]]:
    """(nominal send time, prompt tokens, reply tokens) of every request."""
    tok = Tokenizer()
    out: list[tuple[float, list[int], list[int]]] = []
    for session in workload.sessions:
        t = session.start_s
        messages: list[dict[str, str]] = []
        if session.system is not None:
            messages.append({"role": "system", "content": session.system})
        for turn in session.turns:
            t += turn.think_s
            if session.completion:
                prompt = tok.tokenize(turn.content, add_bos=True)
            else:
                messages.append({"role": "user", "content": turn.content})
                prompt = tok.tokenize(render_chat(messages), add_bos=True)
            pieces = reply_pieces(prompt, turn.max_tokens)
            reply = [tok.piece_id(p) for p in pieces]
            if not session.completion:
                messages.append({"role": "assistant", "content": "".join(pieces)})
            out.append((t, prompt, reply))
            t += _TURN_ESTIMATE_S
    out.sort(key=lambda item: item[0])
    return out


def hit_rate_ceiling(workload: Workload) -> float:
    """Token-weighted share of prompt tokens an ideal, infinite, shared cache would serve."""
    seen: list[list[int]] = []
    hit = total = 0
    for _, prompt, reply in sequences(workload):
        # The longest common prefix with any sorted sequence is with one of its two neighbours.
        i = bisect.bisect_left(seen, prompt)
        best = 0
        for j in (i - 1, i):
            if 0 <= j < len(seen):
                best = max(best, common_prefix_len(seen[j], prompt))
        # llama-server always evaluates the last prompt token, so at most n - 1 can hit.
        hit += min(best, len(prompt) - 1)
        total += len(prompt)
        bisect.insort(seen, prompt + reply)
    return hit / total if total else 0.0
