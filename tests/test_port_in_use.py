"""A port already in use: one line naming --port and exit 2, before any banner or backend, for
the balancer (with --workers too) and for the demo. Real processes, a real listening socket."""

from __future__ import annotations

import socket
import subprocess
import sys
import unittest

from llamacpp_ha.server import listen_error

# Generous: a cold start imports FastAPI, uvicorn and pydantic on a busy 2-core machine.
RUN_TIMEOUT_S = 60.0


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamacpp_ha", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


class PortInUseTest(unittest.TestCase):
    def setUp(self) -> None:
        # Another program's listener, as an operator meets it (no SO_REUSEPORT).
        self.taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.taken.close)
        self.taken.bind(("127.0.0.1", 0))
        self.taken.listen()
        self.port = self.taken.getsockname()[1]

    def assert_one_line_naming_the_port(self, result: subprocess.CompletedProcess[str]) -> None:
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")  # no banner
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(f"--port {self.port}: address already in use", lines[0])
        self.assertIn(f"127.0.0.1:{self.port}", lines[0])

    def test_balancer(self) -> None:
        result = run("--port", str(self.port), "--backend", "http://127.0.0.1:9")
        self.assert_one_line_naming_the_port(result)
        self.assertTrue(result.stderr.startswith("llamacpp-ha: --port"), result.stderr)

    def test_balancer_with_workers(self) -> None:
        # Checked before the workers are forked; the state URL is never reached.
        result = run(
            "--port",
            str(self.port),
            "--backend",
            "http://127.0.0.1:9",
            "--workers",
            "2",
            "--state-url",
            "redis://127.0.0.1:9",
        )
        self.assert_one_line_naming_the_port(result)

    def test_demo_starts_no_simulator_and_prints_no_banner(self) -> None:
        result = run("demo", "--port", str(self.port))
        self.assert_one_line_naming_the_port(result)
        self.assertTrue(result.stderr.startswith("llamacpp-ha demo: --port"), result.stderr)


class ListenErrorTest(unittest.TestCase):
    def test_a_free_port_stays_free_for_a_reuseport_listener(self) -> None:
        # As --workers binds: the check must have held nothing, not even for a moment after.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.assertIsNone(listen_error("127.0.0.1", port))
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            # ... and once a balancer listens there, the port is in use for the next one.
            self.assertIn("address already in use", listen_error("127.0.0.1", port) or "")

    def test_an_address_not_on_this_machine_names_the_host(self) -> None:
        problem = listen_error("192.0.2.1", 8000)  # TEST-NET-1: never a local address
        self.assertIsNotNone(problem)
        self.assertIn("--host 192.0.2.1", problem or "")
