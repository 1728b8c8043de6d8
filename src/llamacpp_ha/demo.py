"""`llamacpp-ha demo`: three simulated llama-servers and the balancer in front of them.

The simulated backends run in a child process (as real llama-servers would run beside the
balancer), with different slot counts and one slower model profile, so queueing, affinity and
cache hits show on the monitor page.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llamacpp_sim import spawn

from .config import build_config
from .server import serve

# Slots and speed per backend: two fast GPUs of different size and one slow CPU box.
NAMES = ("gpu-a", "gpu-b", "cpu-c")
SLOTS = (4, 2, 2)
PROFILES = ("gpu-8b", "gpu-8b", "cpu-1b")


def run_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llamacpp-ha demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(list(argv))

    # In our process group, so that Ctrl-C reaches the backends too; stopped on the way out.
    with spawn(names=NAMES, slots=SLOTS, profile=PROFILES, timeout_s=30) as sim:
        backends = [{"url": b.url, "name": b.name} for b in sim.backends]
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
