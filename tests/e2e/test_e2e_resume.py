"""A stream whose real llama-server is SIGKILLed goes on from another one.

Two llama-servers with the larger random model (so a long answer takes seconds): the stream
starts on the first while the second is not up yet; once the balancer sees the second ready,
the first is killed. The client must get the whole answer, and the second server's own counters
show it computed the continuation's prompt.
"""

from __future__ import annotations

import json
import unittest

import httpx
import pytest
from e2e_harness import CHAT_ALIAS, await_monitor, backend_entry, fleet, metric

pytestmark = pytest.mark.e2e


class ResumeOnRealBackendsTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_killed_backends_stream_goes_on_from_another(self) -> None:
        with fleet(type(self).__name__, model_size="large") as group:
            first = group.add_backend("a", ctx=8192)
            second = group.add_backend("b", ctx=8192)
            group.start(not_yet=[second])
            body = {
                "model": CHAT_ALIAS,
                "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": 1500,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            events: list[dict[str, object]] = []
            done = False
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as http,
                http.stream("POST", f"{group.url}/v1/chat/completions", json=body) as response,
            ):
                self.assertEqual(response.status_code, 200)
                killed = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    events.append(json.loads(line[6:]))
                    if len(events) == 5 and not killed:
                        second.start()
                        second.wait_ready()
                        await await_monitor(
                            http,
                            group.url,
                            lambda m: backend_entry(m, second)["state"] == "ready",
                            timeout_s=20,
                            what="the second backend ready",
                        )
                        first.kill()
                        killed = True
                prompt_tokens = await metric(http, second, "prompt_tokens_total")
                exposition = (await http.get(f"{group.url}/metrics")).text
        self.assertTrue(killed)
        # It was the resume that finished it, not the first server before it died.
        self.assertIn('llamacpp_ha_stream_resumes_total{outcome="resumed"} 1.0', exposition)
        self.assertTrue(done, "the stream did not end with [DONE]")
        self.assertFalse([e for e in events if "error" in e], "the client saw an error event")
        self.assertEqual({e["id"] for e in events}, {events[0]["id"]})
        finish = [
            c["finish_reason"]
            for e in events
            for c in e.get("choices") or []  # type: ignore[attr-defined]
            if c.get("finish_reason")
        ]
        self.assertEqual(finish, ["length"])
        usage = events[-1]["usage"]
        assert isinstance(usage, dict)
        self.assertEqual(usage["completion_tokens"], 1500)
        # The second server computed the continuation's prompt: the question and what the
        # first had delivered (more than the question alone).
        self.assertGreater(prompt_tokens, 20)


if __name__ == "__main__":
    unittest.main()
