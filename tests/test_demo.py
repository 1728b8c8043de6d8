from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unittest
import urllib.request

from serving import free_port


def get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


class DemoTest(unittest.TestCase):
    def test_demo_serves_and_cleans_up(self) -> None:
        port = free_port()
        demo = subprocess.Popen(
            [sys.executable, "-m", "llamacpp_ha", "demo", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while get(base + "/health")[0] != 200:
                self.assertLess(time.monotonic(), deadline, "demo did not become healthy")
                self.assertIsNone(demo.poll())
                time.sleep(0.1)
            body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
            status, reply = get(base + "/v1/chat/completions", body.encode())
            self.assertEqual(status, 200, reply)
            self.assertEqual(json.loads(reply)["usage"]["completion_tokens"], 4)
            data = json.loads(get(base + "/monitor/data")[1])
            self.assertEqual([b["name"] for b in data["backends"]], ["gpu-a", "gpu-b", "cpu-c"])
            self.assertEqual([b["slots_total"] for b in data["backends"]], [4, 2, 2])
            demo.send_signal(signal.SIGINT)
            output, _ = demo.communicate(timeout=15)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
        self.assertEqual(demo.returncode, 0, output)
        self.assertIn(f"{base}/monitor", output)
        self.assertIn("curl", output)
        # The simulated backends were a child of the demo, in its process group: none is left.
        with self.assertRaises(ProcessLookupError):
            os.killpg(demo.pid, 0)
