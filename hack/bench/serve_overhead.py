#!/usr/bin/env python
"""Benchmark: the router's overhead, as ratios against calling the policy deployment directly.

Two Serve applications on one local Ray head, same artifact, same policy code and batching,
one replica per deployment:

* ``router``   (the product): HTTP -> Serve proxy -> ``router`` -> handle -> ``policy-<v>``
  (``rl_engine.serving.app:build_app``, deployed with ``rl_operator.rayserve``);
* ``direct``   (the baseline): HTTP -> Serve proxy -> ``policy-<v>`` as the ingress
  (``rl_engine.serving.app:build_policy_app``).

Closed-loop clients (``--concurrency`` of them, each one request at a time, asyncio + httpx)
on loopback only; a fixed number of requests per arm, split into rounds that alternate the
arms so both see the same background load; every run is bounded by ``--max-seconds``.
Prints requests/s and p50/p99 latency per arm and the router/direct ratios, and writes JSON.

    .venv/bin/python hack/bench/serve_overhead.py                  # own Ray head, trains a policy
    .venv/bin/python hack/bench/serve_overhead.py --requests 2000 --concurrency 1 8 --json out.json

Without ``--dashboard``/``--serve`` it starts its own head (``hack/ray-up.sh``, instance
``rlops-bench`` on free ports) and stops it at the end; with them it uses that head and deletes
only its two applications afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rl_operator import rayserve

REPO = Path(__file__).resolve().parents[2]

NAMESPACE, AGENT, VERSION = "bench", "cartpole", "v1"
OBS = [0.01, -0.02, 0.03, 0.04]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def start_head() -> tuple[dict[str, str], str, str]:
    names = ["RLOPS_RAY_DASHBOARD_PORT", "RLOPS_SERVE_PORT", "RLOPS_RAY_METRICS_PORT", "RLOPS_RAY_GCS_PORT",
             "RLOPS_RAY_CLIENT_PORT", "RLOPS_RAY_AGENT_PORT", "RLOPS_RAY_AGENT_GRPC_PORT", "RLOPS_RAY_RUNTIME_ENV_PORT"]
    env = {**os.environ, "RLOPS_RAY_NAME": "rlops-bench", **{k: str(p) for k, p in zip(names, free_ports(len(names)))}}
    subprocess.run(["bash", str(REPO / "hack" / "ray-up.sh")], env=env, check=True, timeout=600)
    return env, f"http://127.0.0.1:{env['RLOPS_RAY_DASHBOARD_PORT']}", f"http://127.0.0.1:{env['RLOPS_SERVE_PORT']}"


def train(workdir: Path) -> dict[str, str]:
    config = {"agent": AGENT, "namespace": NAMESPACE, "run": "bench-1",
              "environment": {"id": "CartPole-v1", "numEnvs": 4}, "algorithm": {"name": "PPO"},
              "training": {"totalTimesteps": 4096, "seed": 1}, "evaluation": {"episodes": 5}}
    (workdir / "config.json").write_text(json.dumps(config))
    uri = f"file://{workdir / 'bench-1'}"
    subprocess.run([sys.executable, "-m", "rl_engine.train", "--config", str(workdir / "config.json"),
                    "--artifact-uri", uri], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "RLOPS_TERMINATION_MESSAGE_PATH": str(workdir / "term")})
    return {"artifactURI": uri, "fingerprint": json.loads((workdir / "term").read_text())["fingerprint"]}


async def run_arm(url: str, n: int, concurrency: int, deadline: float) -> tuple[list[float], float, int]:
    """``n`` POSTs by ``concurrency`` closed-loop workers; returns (latencies s, wall s, failures)."""
    latencies: list[float] = []
    failures = 0
    remaining = n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                t0 = time.perf_counter()
                resp = await client.post(url, json={"observation": OBS})
                latencies.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, wall, failures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def compare_arms(urls: dict[str, str], treatment: str, baseline: str, args: argparse.Namespace) -> list[dict]:
    """Warm both arms up, then for each ``args.concurrency`` run ``args.requests`` per arm in
    ``args.rounds`` rounds that alternate the arms. Returns one row per concurrency: per arm
    requests, failures, req/s, p50/p99/mean ms, and ``ratio`` treatment/baseline."""
    deadline = time.monotonic() + args.max_seconds
    for url in urls.values():
        asyncio.run(run_arm(url, args.warmup, 4, deadline))
    results = []
    for c in args.concurrency:
        lat: dict[str, list[float]] = {treatment: [], baseline: []}
        wall = {treatment: 0.0, baseline: 0.0}
        fails = {treatment: 0, baseline: 0}
        per_round = max(1, args.requests // args.rounds)
        for r in range(args.rounds):
            for arm in ([treatment, baseline] if r % 2 == 0 else [baseline, treatment]):
                ls, w, f = asyncio.run(run_arm(urls[arm], per_round, c, deadline))
                lat[arm] += ls
                wall[arm] += w
                fails[arm] += f
        row: dict = {"concurrency": c}
        for arm in (treatment, baseline):
            row[arm] = {"requests": len(lat[arm]), "failures": fails[arm],
                        "rps": len(lat[arm]) / wall[arm] if wall[arm] else 0.0,
                        "p50_ms": 1000 * percentile(lat[arm], 50), "p99_ms": 1000 * percentile(lat[arm], 99),
                        "mean_ms": 1000 * statistics.fmean(lat[arm])}
        row["ratio"] = {"rps": row[treatment]["rps"] / row[baseline]["rps"],
                        "p50": row[treatment]["p50_ms"] / row[baseline]["p50_ms"],
                        "p99": row[treatment]["p99_ms"] / row[baseline]["p99_ms"]}
        results.append(row)
        if time.monotonic() >= deadline:
            print(f"stopped at --max-seconds {args.max_seconds}", file=sys.stderr)
            break
    return results


def print_arms(results: list[dict], treatment: str, baseline: str) -> None:
    """The table of :func:`compare_arms`' rows, baseline first, then the ratios."""
    print(f"{'clients':>7} {'arm':>7} {'requests':>8} {'fail':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for row in results:
        for arm in (baseline, treatment):
            a = row[arm]
            print(f"{row['concurrency']:>7} {arm:>7} {a['requests']:>8} {a['failures']:>4} {a['rps']:>8.1f} "
                  f"{a['p50_ms']:>8.2f} {a['p99_ms']:>8.2f}")
        q = row["ratio"]
        print(f"{row['concurrency']:>7} {'ratio':>7} {treatment}/{baseline}: req/s x{q['rps']:.2f}, "
              f"p50 x{q['p50']:.2f}, p99 x{q['p99']:.2f}")


def arm_parser(description: str, max_seconds: float) -> argparse.ArgumentParser:
    """The options of :func:`compare_arms` (requests, concurrency, rounds, warm-up, time bound, JSON)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--requests", type=int, default=2000, help="requests per arm and concurrency (default 2000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="closed-loop clients (default 1 8)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per concurrency (default 4)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up requests per arm (default 200)")
    p.add_argument("--max-seconds", type=float, default=max_seconds,
                   help=f"bound on the whole measurement (default {max_seconds:g})")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = arm_parser(__doc__.split("\n\n")[0], 600)
    p.add_argument("--artifact-uri", help="serve this artifact (default: train a small CartPole policy)")
    p.add_argument("--dashboard", help="use this Ray dashboard (with --serve) instead of starting a head")
    p.add_argument("--serve", help="Serve HTTP base URL of --dashboard's head")
    args = p.parse_args(argv)

    env = None
    if args.dashboard and args.serve:
        dashboard, serve = args.dashboard, args.serve
    else:
        env, dashboard, serve = start_head()
    tmp = tempfile.TemporaryDirectory(prefix="rlops-bench-")
    router_app = rayserve.app_name(NAMESPACE, AGENT)
    direct_app = f"{NAMESPACE}-direct"
    try:
        if args.artifact_uri:
            from rl_engine.artifacts import compute_fingerprint

            artifact = {"artifactURI": args.artifact_uri, "fingerprint": compute_fingerprint(args.artifact_uri)}
        else:
            artifact = train(Path(tmp.name))
        routed = rayserve.app_config(NAMESPACE, AGENT, {VERSION: artifact}, {VERSION: 100})
        direct = {**routed, "name": direct_app, "route_prefix": f"/{NAMESPACE}/direct",
                  "import_path": "rl_engine.serving.app:build_policy_app", "deployments": []}
        rayserve.apply_application(dashboard, routed)
        rayserve.apply_application(dashboard, direct)
        rayserve.wait_running(dashboard, router_app, 300, expect=routed)
        rayserve.wait_running(dashboard, direct_app, 300)
        urls = {"router": f"{serve}/{NAMESPACE}/{AGENT}", "direct": f"{serve}/{NAMESPACE}/direct"}

        results = compare_arms(urls, "router", "direct", args)
        print_arms(results, "router", "direct")
        out = {"cpus": os.cpu_count(), "requestsPerArm": args.requests, "rounds": args.rounds,
               "baseline": "HTTP -> proxy -> policy deployment as ingress (build_policy_app)",
               "results": results}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0 if all(row[a]["failures"] == 0 for row in results for a in urls) else 1
    finally:
        tmp.cleanup()
        if env is not None:
            subprocess.run(["bash", str(REPO / "hack" / "ray-down.sh")], env=env, check=False, timeout=120)
        else:
            for name in (router_app, direct_app):
                try:
                    rayserve.delete_application(dashboard, name)
                except rayserve.RayServeError as err:
                    print(f"could not delete {name}: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
