"""TLS terminated by llamacpp-ha itself."""

from __future__ import annotations

import ssl
import subprocess
import tempfile
import unittest
from pathlib import Path

import httpx

from llamacpp_ha.config import build_config
from llamacpp_ha.proxy import create_app
from llamacpp_ha.registry import BackendState
from llamacpp_sim import SimConfig
from serving import serve_app, sims
from sim_support import wait_until


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class TlsTest(unittest.IsolatedAsyncioTestCase):
    async def test_https_with_a_certificate_of_ours(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = self_signed(Path(tmp))
            async with sims(SimConfig(slots=1, profile="test")) as (sim,):
                config = build_config(
                    {"backends": [sim.url], "tls_certfile": cert, "tls_keyfile": key,
                     "poll_interval_s": 0.1, "shutdown_grace_s": 1}
                )  # fmt: skip
                async with serve_app(create_app(config)) as served:
                    url = served.url.replace("http://", "https://")
                    await wait_until(lambda: served.balancer.registry.backends[0].routable)
                    trust = ssl.create_default_context(cafile=str(cert))
                    async with httpx.AsyncClient(verify=trust, timeout=10) as client:
                        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                        response = await client.post(url + "/v1/chat/completions", json=body)
                        self.assertEqual(response.status_code, 200)
                        self.assertEqual(response.json()["usage"]["completion_tokens"], 2)
                    async with httpx.AsyncClient(timeout=10) as plain:
                        with self.assertRaises(httpx.HTTPError):
                            await plain.get(served.url + "/health")  # no cleartext on that port

    async def test_https_backend_with_a_private_ca(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = self_signed(Path(tmp))
            backend = SimConfig(
                slots=1, profile="test", tls_certfile=str(cert), tls_keyfile=str(key)
            )
            async with sims(backend) as (sim,):
                self.assertTrue(sim.url.startswith("https://"))
                for backend_config, works in (
                    ({"url": sim.url, "ca_file": str(cert)}, True),
                    ({"url": sim.url, "tls_verify": False}, True),
                    ({"url": sim.url}, False),  # an unknown CA is not trusted by default
                ):
                    config = build_config(
                        {
                            "backends": [backend_config],
                            "poll_interval_s": 0.1,
                            "shutdown_grace_s": 1,
                        }
                    )
                    async with (
                        serve_app(create_app(config)) as served,
                        httpx.AsyncClient() as client,
                    ):
                        backend_state = served.balancer.registry.backends[0]
                        if works:

                            def routable(b: BackendState = backend_state) -> bool:
                                return b.routable

                            await wait_until(routable)
                            body = {
                                "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 2,
                            }
                            response = await client.post(
                                served.url + "/v1/chat/completions", json=body
                            )
                            self.assertEqual(response.status_code, 200)
                        else:

                            def polled(b: BackendState = backend_state) -> bool:
                                return b.last_poll_at is not None

                            await wait_until(polled)
                            self.assertEqual(backend_state.state, "dead")
