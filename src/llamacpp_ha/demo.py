"""`llamacpp-ha demo`: three simulated llama-servers and the balancer in front of them.

The simulated backends run in a child process (as real llama-servers would run beside the
balancer), with different slot counts and one slower model profile, so queueing, affinity and
cache hits show on the monitor page.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Sequence

from .config import build_config
from .server import serve

# Slots and speed per backend: two fast GPUs of different size and one slow CPU box.
SLOTS = "4,2,2"
PROFILES = "gpu-8b,gpu-8b,cpu-1b"
NAMES = ("gpu-a", "gpu-b", "cpu-c")
_LISTENING = re.compile(r"listening on (http://\S+)")


def start_backends(count: int = 3) -> tuple[subprocess.Popen[str], list[str]]:
    command = [sys.executable, "-m", "llamacpp_sim", "--port", "0", "--count", str(count)]
    command += ["--slots", SLOTS, "--profile", PROFILES]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    urls: list[str] = []
    while len(urls) < count:
        line = child.stdout.readline()
        if not line:
            child.wait()
            raise RuntimeError(f"the simulated backends exited with status {child.returncode}")
        found = _LISTENING.search(line)
        if found:
            urls.append(found.group(1))
    return child, urls


def run_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llamacpp-ha demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(list(argv))

    child, urls = start_backends()
    try:
        backends = [{"url": url, "name": name} for url, name in zip(urls, NAMES, strict=True)]
        config = build_config({"host": args.host, "port": args.port, "backends": backends})
        base = f"http://{args.host}:{args.port}"
        print(
            "\nllamacpp-ha demo: simulated backends gpu-a (4 slots), gpu-b (2), cpu-c (2, slow)\n"
            f"  OpenAI endpoint  {base}/v1\n"
            f"  monitor          {base}/monitor\n"
            f"  try              curl {base}/v1/chat/completions"
            " -H 'Content-Type: application/json'"
            ' -d \'{"messages":[{"role":"user","content":"Hello"}]}\'\n'
            f"  conversations    .venv/bin/python examples/conversations.py --base-url {base}/v1\n"
            "  Ctrl-C stops the demo and its backends.\n",
            flush=True,
        )
        return serve(config)
    finally:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
