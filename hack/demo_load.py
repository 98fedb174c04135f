"""Client traffic for the demo's agent, so that its canary has something to be analysed on.

    .venv/bin/python hack/demo_load.py [--url URL] [--rate PER_SECOND] [--seconds N]

Posts CartPole observations, drawn uniformly from a small box around upright (4 floats in
[-0.05, 0.05]), to the agent's route, and prints every 5 s which version answered how many
(the canary's share follows its weight), and how many requests failed. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import httpx
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/default/cartpole", help="the agent's route")
    # the analysis needs minSampleCount (100) canary requests within windowSeconds (60): at a 10%
    # canary weight, that is 17 requests per second at least
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: until Ctrl-C)")
    args = parser.parse_args()
    rng = np.random.default_rng()
    answered: Counter[str] = Counter()
    start = last = time.monotonic()
    sent = 0
    with httpx.Client(timeout=10) as client:
        try:
            while not args.seconds or time.monotonic() - start < args.seconds:
                observation = rng.uniform(-0.05, 0.05, size=4).tolist()
                try:
                    resp = client.post(args.url, json={"observation": observation})
                    answered[resp.json().get("version", "?") if resp.status_code == 200 else f"HTTP {resp.status_code}"] += 1
                except (httpx.HTTPError, ValueError) as err:
                    answered[type(err).__name__] += 1
                if time.monotonic() - last >= 5:
                    last = time.monotonic()
                    print(f"[{last - start:5.0f}s] " + ", ".join(f"{k}: {v}" for k, v in sorted(answered.items())),
                          flush=True)
                    answered.clear()
                sent += 1
                time.sleep(max(0.0, start + sent / args.rate - time.monotonic()))  # paced, whatever the latency
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
