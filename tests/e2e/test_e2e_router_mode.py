"""Router mode on a real llama-server: two models over one server, loaded on demand.

One llama-server in router mode (`--models-dir` with two copies of the tiny model, tiny-a and
tiny-b, `--models-max 1`: loading one unloads the other), behind a balancer. What the server
itself says is the truth: its `/models`, its per-model `/metrics`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import unittest
from typing import Any, ClassVar

import httpx
import pytest
from e2e_harness import Fleet, LlamaServer, fleet

pytestmark = pytest.mark.e2e

MODELS = ("tiny-a", "tiny-b")


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    return None


class RouterModeTest(unittest.IsolatedAsyncioTestCase):
    fleet: ClassVar[Fleet]
    router: ClassVar[LlamaServer]

    @classmethod
    def setUpClass(cls) -> None:
        context = fleet(cls.__name__)
        cls.fleet = context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)
        models = cls.fleet.log_dir / "models"
        models.mkdir()
        for name in MODELS:
            target = models / f"{name}.gguf"
            try:
                os.link(cls.fleet.model, target)
            except OSError:
                shutil.copyfile(cls.fleet.model, target)
        cls.router = cls.fleet.add_backend("router", model=models, models_max=1)
        cls.fleet.start()

    async def asyncSetUp(self) -> None:
        self.url = self.fleet.url
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    async def asyncTearDown(self) -> None:
        await self.http.aclose()

    async def chat(self, model: str, content: str = "hello") -> httpx.Response:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 24,
        }
        return await self.http.post(f"{self.url}/v1/chat/completions", json=body)

    async def loads(self, model: str, outcome: str) -> float:
        text = (await self.http.get(f"{self.url}/metrics")).text
        total = 0.0
        labels = (f'model="{model}"', f'outcome="{outcome}"')
        for line in text.splitlines():
            if line.startswith("llamacpp_ha_model_loads_total{") and all(x in line for x in labels):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def server_statuses(self) -> dict[str, str]:
        data = (await self.http.get(f"{self.router.url}/models")).json()
        return {m["id"]: m["status"]["value"] for m in data["data"]}

    async def test_both_models_serve_through_the_balancer_each_loaded_once(self) -> None:
        listed = (await self.http.get(f"{self.url}/v1/models")).json()["data"]
        self.assertEqual(sorted(m["id"] for m in listed), list(MODELS))
        deferred: list[float] = []
        stop = asyncio.Event()

        async def watch(model: str) -> None:
            # llama-server's own count of requests waiting inside it for a slot.
            while not stop.is_set():
                answer = await self.http.get(
                    f"{self.router.url}/metrics?model={model}&autoload=false"
                )
                if answer.status_code == 200:
                    value = _metric(answer.text, "requests_deferred")
                    if value is not None:
                        deferred.append(value)
                await asyncio.sleep(0.02)

        for model in MODELS:
            self.assertEqual(await self.loads(model, "started"), 0)
            watcher = asyncio.create_task(watch(model))
            # Six requests at once for a model loaded nowhere (or unloaded by the last one).
            answers = await asyncio.gather(*(self.chat(model, f"q{i}") for i in range(6)))
            stop.set()
            await watcher
            stop.clear()
            self.assertEqual([a.status_code for a in answers], [200] * 6, answers[0].text)
            self.assertEqual({a.json()["model"] for a in answers}, {model})
            self.assertEqual(await self.loads(model, "started"), 1)  # one load, six requests
            self.assertEqual(await self.loads(model, "done"), 1)
            self.assertEqual((await self.server_statuses())[model], "loaded")
        # Never more requests on a model instance than its slots: none waited inside it.
        self.assertTrue(deferred, "the instances' /metrics were never read")
        self.assertEqual(max(deferred), 0)
        listed = (await self.http.get(f"{self.url}/v1/models")).json()["data"]
        where = {m["id"]: m["loaded_on"] for m in listed}
        self.assertEqual(
            where, {"tiny-a": [], "tiny-b": [self.router.balancer_url.removeprefix("http://")]}
        )


if __name__ == "__main__":
    unittest.main()
