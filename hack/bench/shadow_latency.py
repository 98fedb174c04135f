#!/usr/bin/env python
"""Benchmark: what a shadow (observe mode) costs the clients, as a ratio against the same router
without one.

Two Serve applications on one local Ray head, both ``rl_engine.serving.app:build_app``, same
artifact, same policy code and batching, one replica per deployment:

* ``plain``  (the baseline): the router and one version, ``{"weights": {"v1": 100}}``;
* ``shadow`` (observe mode): the router, the same version and a shadow (a second policy
  deployment of the same artifact), ``{"weights": {"v1": 100, "v2": 0}, "shadow": "v2"}``: every
  request is also sent to the shadow after its answer is ready, and the two actions compared.

Closed-loop clients as in ``serve_overhead.py`` (whose helpers this script uses), rounds that
alternate the arms. Prints p50/p99 latency and requests/s per arm and the shadow/plain ratios,
and how many answers the shadow really compared (its decisions counter, from Ray's metrics
endpoint; exit 1 when none), and writes JSON. Starts its own head (instance ``rlops-bench``).

    .venv/bin/python hack/bench/shadow_latency.py --requests 2000 --concurrency 1 8 --json /tmp/shadow.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rl_operator import rayserve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_overhead import REPO, arm_parser, compare_arms, print_arms, start_head, train  # noqa: E402

NAMESPACE = "bench"


def counter(metrics_url: str, name: str, agent: str) -> float:
    """One of the router's counters for ``agent``, summed over Ray's exported samples."""
    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith(f"ray_{name}_total{{") and f'agent="{agent}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: list[str] | None = None) -> int:
    p = arm_parser(__doc__.split("\n\n")[0], 900)
    args = p.parse_args(argv)

    env, dashboard, serve = start_head()
    metrics_url = f"http://127.0.0.1:{env['RLOPS_RAY_METRICS_PORT']}/metrics"
    tmp = tempfile.TemporaryDirectory(prefix="rlops-bench-")
    try:
        artifact = train(Path(tmp.name))
        plain = rayserve.app_config(NAMESPACE, "plain", {"v1": artifact}, {"v1": 100})
        shadow = rayserve.app_config(NAMESPACE, "shadow", {"v1": artifact, "v2": artifact}, {"v1": 100, "v2": 0},
                                     router_extras={"shadow": "v2"})
        for app in (plain, shadow):
            rayserve.apply_application(dashboard, app)
        for app in (plain, shadow):
            rayserve.wait_running(dashboard, app["name"], 300, expect=app)
        urls = {"plain": f"{serve}/{NAMESPACE}/plain", "shadow": f"{serve}/{NAMESPACE}/shadow"}
        results = compare_arms(urls, "shadow", "plain", args)
        time.sleep(12)  # the metrics agent's report interval (Ray's default: 10 s)
        compared = counter(metrics_url, "rlops_serve_compared_decisions", "shadow")
        dropped = counter(metrics_url, "rlops_serve_mirror_dropped", "shadow")
        sent = sum(row["shadow"]["requests"] for row in results) + args.warmup
        print_arms(results, "shadow", "plain")
        print(f"the shadow compared {compared:.0f} of {sent} answers; {dropped:.0f} mirrors dropped "
              "(queue full or the shadow failed)")
        out = {"cpus": os.cpu_count(), "requestsPerArm": args.requests, "rounds": args.rounds,
               "baseline": "the same router and version without a shadow", "compared": compared, "dropped": dropped,
               "sent": sent,
               "results": results}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0 if compared > 0 and all(row[a]["failures"] == 0 for row in results for a in ("plain", "shadow")) \
            else 1
    finally:
        tmp.cleanup()
        subprocess.run(["bash", str(REPO / "hack" / "ray-down.sh")], env=env, check=False, timeout=120)


if __name__ == "__main__":
    sys.exit(main())
