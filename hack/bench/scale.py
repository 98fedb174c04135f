#!/usr/bin/env python
"""Benchmark: N RLAgents at once on one operator (``make bench-scale``).

What is real: the control plane (etcd, kube-apiserver, kube-controller-manager with its Job
controller, kube-scheduler), the operator (a local process, as the rlops-operator
ServiceAccount, with its approval webhook, called by the API server), and the approvals
(``rlops.dev/approve``, sent by an approver as soon as each Rollout waits for one). What is
fake: the trainer. The training pods land on kwok nodes whose Stage
(``hack/bench/kwok-stages.yaml``) ends each pod 3-5 s after it is scheduled, exit code 0,
with the JSON summary a real trainer writes as its termination message.

Each agent: CartPole, serving disabled (no Ray here), manual approval. Its life cycle, from
``apply`` to its Rollout ``Approved``: TrainingRun, Job, pod, run ``Succeeded``, Rollout
``AwaitingApproval``, approval through the webhook, Rollout ``Approved``.

Reports:

* p50/p99 seconds from apply to the Job's creation, and from the Job's completion to the run's
  ``Succeeded`` (times are when this script's watches saw each event);
* the operator's CPU seconds and peak RSS (``/proc``: utime+stime, VmHWM);
* API requests per agent: the API server's own count of the operator's requests
  (``apiserver_flowcontrol_request_execution_seconds_count`` of the chart's FlowSchema for
  the operator's ServiceAccount, ``type="regular"``: every request but watches; watches apart);
* the approval webhook: the approver's patch latency p50/p99 (API server + webhook), failures,
  and the operator's own ``rlops_admission_review_duration_seconds`` p99 (from its buckets);
* the operator's log lines with an HTTP 5xx or a webhook timeout.

Usage (its own cluster, ``rlops-bench``; deleted at the end unless ``--keep``)::

    .venv/bin/python hack/bench/scale.py --agents 100 500 1000 --json /tmp/scale.json
    .venv/bin/python hack/bench/scale.py --agents 100 --tree /tmp/rlops-before   # an older checkout

``--baseline`` first runs each size with the least controller in the operator's place
(``hack/bench/minimal_controller.py``: per agent, the same run and Job, one status write, no
kopf, no caches, no Events, no Rollouts) and prints the operator's figures as ratios to it:
the baseline is the floor that this machine and control plane set.

``--tree`` runs the operator, its CRDs and RBAC from another checkout (the "before" figures of
docs/benchmarks.md); the stages, the nodes and the measuring stay this checkout's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes import client, watch
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RLOPS_CACHE", Path.home() / ".cache" / "rlops"))
NAME = "rlops-bench"
CLUSTER_DIR = CACHE / "clusters" / NAME
KUBECTL = str(CACHE / "bin" / "current" / "kubectl")
HELM = str(CACHE / "bin" / "current" / "helm")
ENV = {**os.environ, "RLOPS_CLUSTER_NAME": NAME, "RLOPS_NO_OPERATOR": "1", "RLOPS_AUDIT_PORT": "8391",
       "RLOPS_KWOK_STAGES": str(REPO / "hack" / "bench" / "kwok-stages.yaml")}
GROUP, VERSION = "rlops.dev", "v1alpha1"
RUN_LABEL = "rlops.dev/training-run"
NAMESPACES = 10
#: Seconds of the idle window that measures the operator's requests that come with time, not with agents.
IDLE_SECONDS = 20
PODS_PER_NODE = 250
FLOW_SCHEMA = "rlops-operator"


def log(msg: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, input: str | None = None, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env or ENV)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {proc.stderr[-2000:]}")
    return proc.stdout


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    return sh(KUBECTL, "--kubeconfig", str(CLUSTER_DIR / "kubeconfig"), *args, input=input, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative ``{le: count}`` buckets (seconds)."""
    if not buckets or buckets.get(math.inf, 0) == 0:
        return None
    rank = q * buckets[math.inf]
    prev_le, prev_count = 0.0, 0.0
    for le in sorted(buckets):
        count = buckets[le]
        if count >= rank:
            if le == math.inf:
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / max(count - prev_count, 1e-12))
        prev_le, prev_count = le, count
    return None


# ----------------------------------------------------------------------------- cluster


def cluster_up(tree: Path, nodes: int) -> None:
    log(f"cluster {NAME}: control plane, CRDs and RBAC from {tree}, kwok stages {ENV['RLOPS_KWOK_STAGES']}")
    sh("bash", str(REPO / "hack" / "cluster-up.sh"))
    kubectl("apply", "-k", str(tree / "manifests" / "overlays" / "local"))
    kubectl("wait", "--for", "condition=Established", "--timeout=60s", "crd/rlagents.rlops.dev",
            "crd/trainingruns.rlops.dev", "crd/rollouts.rlops.dev")
    # the chart's FlowSchema for the operator's ServiceAccount: its requests get counted apart
    flow = sh(HELM, "template", "rlops", str(REPO / "charts" / "rlops"), "-n", "rlops-system",
              "--show-only", "templates/flowschema.yaml")
    kubectl("apply", "-f", "-", input=flow)
    docs = []
    for i in range(nodes):
        docs.append({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"bench-{i}", "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"type": "kwok", "rlops.dev/bench-pool": "true", "kubernetes.io/hostname": f"bench-{i}"}},
            "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
            "status": {"capacity": {"cpu": "1k", "memory": "4Ti", "pods": str(PODS_PER_NODE)},
                       "allocatable": {"cpu": "1k", "memory": "4Ti", "pods": str(PODS_PER_NODE)}},
        })
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    kubectl("wait", "--for", "condition=Ready", "--timeout=120s", *[f"node/bench-{i}" for i in range(nodes)])
    for n in range(NAMESPACES):
        kubectl("create", "namespace", f"bench-{n}", check=False)


def cluster_down() -> None:
    sh("bash", str(REPO / "hack" / "cluster-down.sh"), check=False)


class Operator:
    """``python -m rl_operator`` from ``tree``, as the rlops-operator ServiceAccount."""

    def __init__(self, tree: Path, workdir: Path, breakdown: bool = False, baseline: bool = False):
        self.tree, self.workdir, self.breakdown, self.baseline = tree, workdir, breakdown, baseline
        self.requests_path = workdir / "requests.json"
        self.metrics_port, self.health_port, self.webhook_port = free_port(), free_port(), free_port()
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        kubeconfig = sh("bash", str(REPO / "hack" / "operator-kubeconfig.sh")).strip()
        env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": str(self.tree / "operator"),
               "RLOPS_ARTIFACT_ROOT": f"file://{self.workdir / 'artifacts'}",
               "RLOPS_WEBHOOK_PORT": str(self.webhook_port), "RLOPS_CERT_DIR": str(self.workdir / "certs"),
               "RLOPS_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}", "RLOPS_ALERT_RECEIVER": "",
               "RLOPS_AUDIT_RECEIVER": "127.0.0.1:8391", "RLOPS_AUDIT_CERT_DIR": str(CLUSTER_DIR / "audit-certs")}
        main = ["-m", "rl_operator"]
        if self.baseline:  # the least a controller does per agent (hack/bench/minimal_controller.py)
            main = [str(REPO / "hack" / "bench" / "minimal_controller.py")]
        elif self.breakdown:  # the same operator, its requests counted by kind (hack/bench/count_requests.py)
            main = [str(REPO / "hack" / "bench" / "count_requests.py")]
            env["RLOPS_COUNT_REQUESTS_OUT"] = str(self.requests_path)
            self.requests_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, *main, "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"],
            env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("operator not healthy within 90 s")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def operator_requests() -> dict[str, float]:
    """The API server's count of the operator's requests so far: ``{"regular": n, "watch": n}``."""
    text = kubectl("get", "--raw", "/metrics")
    out = {"regular": 0.0, "watch": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "apiserver_flowcontrol_request_execution_seconds_count" and \
                    s.labels.get("flow_schema") == FLOW_SCHEMA:
                out[s.labels.get("type", "regular")] = out.get(s.labels.get("type", "regular"), 0.0) + s.value
    return out


# ----------------------------------------------------------------------------- the run


def agent_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RLAgent", "metadata": {"name": name},
        "spec": {
            "environment": {"id": "CartPole-v1", "numEnvs": 1},
            "training": {"totalTimesteps": 2048, "evalInterval": 2048, "resources": {"gpu": 0, "cpu": "10m", "memory": "64Mi"},
                         "nodeSelector": {"rlops.dev/bench-pool": "true"},
                         "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]},
            "serving": {"enabled": False},
        },
    }


class Watcher:
    """First-seen times (monotonic seconds) of the events measured, from watches of their own."""

    def __init__(self) -> None:
        self.job_created: dict[tuple[str, str], float] = {}
        self.job_complete: dict[tuple[str, str], float] = {}
        self.run_succeeded: dict[tuple[str, str], float] = {}
        self.rollout_phase: dict[tuple[str, str], str] = {}
        self.awaiting: "list[tuple[str, str, str]]" = []
        self.cond = threading.Condition()
        self._stop = threading.Event()

    def _loop(self, list_fn, handle, **kw) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(list_fn, timeout_seconds=60, **kw):
                    handle(ev["object"] if isinstance(ev["object"], dict) else client.ApiClient().sanitize_for_serialization(ev["object"]))
                    if self._stop.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - a watch that drops is restarted
                log(f"watch restarted: {exc!r}"[:200])
                time.sleep(1)

    def _job(self, job: dict[str, Any]) -> None:
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        now = time.monotonic()
        with self.cond:
            self.job_created.setdefault(key, now)
            if any(c.get("type") == "Complete" and c.get("status") == "True" for c in (job.get("status") or {}).get("conditions") or []):
                self.job_complete.setdefault(key, now)

    def _run(self, run: dict[str, Any]) -> None:
        key = (run["metadata"]["namespace"], run["metadata"]["name"])
        if (run.get("status") or {}).get("phase") == "Succeeded":
            with self.cond:
                self.run_succeeded.setdefault(key, time.monotonic())

    def _rollout(self, ro: dict[str, Any]) -> None:
        key = (ro["metadata"]["namespace"], ro["metadata"]["name"])
        phase = (ro.get("status") or {}).get("phase") or "Pending"
        with self.cond:
            if phase == "AwaitingApproval" and self.rollout_phase.get(key) != "AwaitingApproval" and \
                    "rlops.dev/approve" not in (ro["metadata"].get("annotations") or {}):
                self.awaiting.append((*key, ro["spec"]["fingerprint"]))
            self.rollout_phase[key] = phase
            self.cond.notify_all()

    def start(self) -> None:
        batch, custom = client.BatchV1Api(), client.CustomObjectsApi()
        for target in (
            lambda: self._loop(batch.list_job_for_all_namespaces, self._job, label_selector=RUN_LABEL),
            lambda: self._loop(custom.list_cluster_custom_object, self._run, group=GROUP, version=VERSION,
                               plural="trainingruns"),
            lambda: self._loop(custom.list_cluster_custom_object, self._rollout, group=GROUP, version=VERSION,
                               plural="rollouts"),
        ):
            threading.Thread(target=target, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def run_once(n: int, tree: Path, workdir: Path, timeout: float, breakdown: bool = False,
             baseline: bool = False) -> dict[str, Any]:
    nodes = max(1, math.ceil(n / (PODS_PER_NODE * 0.8)))
    cluster_up(tree, nodes)
    kubernetes.config.load_kube_config(str(CLUSTER_DIR / "kubeconfig"))
    op = Operator(tree, workdir, breakdown, baseline)
    try:
        result = _measure(n, nodes, op, timeout)
    finally:
        op.stop()
    if breakdown and op.requests_path.exists():
        counts = json.loads(op.requests_path.read_text())
        result["requests_per_agent_by_kind"] = {k: round(v / n, 2) for k, v in counts.items() if v / n >= 0.05}
    return result


def _measure(n: int, nodes: int, op: Operator, timeout: float) -> dict[str, Any]:
    op.start()
    log(f"operator pid {op.proc.pid} (log {op.log_path})")
    time.sleep(5)  # its start-up requests (webhook configuration, key Secret, first lists) are not per agent
    watcher = Watcher()
    watcher.start()
    time.sleep(2)
    # the operator's requests that come with time, not with agents (its webhook certificate's
    # Secret, kopf's API discovery): counted over an idle window, taken off the per-agent figure
    idle0, t_idle = operator_requests()["regular"], time.monotonic()
    time.sleep(IDLE_SECONDS)
    background = (operator_requests()["regular"] - idle0) / (time.monotonic() - t_idle)
    requests0, cpu0 = operator_requests(), op.cpu_seconds()
    custom = client.CustomObjectsApi()
    applied: dict[tuple[str, str], float] = {}
    approvals: list[float] = []
    approval_failures: list[str] = []

    def apply(i: int) -> None:
        ns, name = f"bench-{i % NAMESPACES}", f"a{i:04d}"
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "rlagents", agent_body(name))
        applied[(ns, f"{name}-1")] = time.monotonic()

    def approve(ns: str, name: str, fingerprint: str) -> None:
        t0 = time.monotonic()
        try:
            custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "rollouts", name,
                                                  {"metadata": {"annotations": {"rlops.dev/approve": fingerprint}}})
            approvals.append(time.monotonic() - t0)
        except client.ApiException as exc:
            approval_failures.append(f"{ns}/{name}: {exc.status} {exc.reason}: {(exc.body or '')[:200]}")

    start = time.monotonic()
    log(f"applying {n} agents (8 clients) across {NAMESPACES} namespaces, {nodes} kwok nodes")
    approvers = ThreadPoolExecutor(4)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(apply, range(n)))
    log(f"applied in {time.monotonic() - start:.1f} s")
    deadline = start + timeout
    last_report = 0.0
    while time.monotonic() < deadline:
        with watcher.cond:
            watcher.cond.wait(timeout=1.0)
            todo, watcher.awaiting = watcher.awaiting, []
            approved = sum(1 for p in watcher.rollout_phase.values() if p == "Approved")
            succeeded = len(watcher.run_succeeded)
        for item in todo:
            approvers.submit(approve, *item)
        if approved >= n or (op.baseline and succeeded >= n):  # the baseline makes no Rollouts
            break
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            log(f"{time.monotonic() - start:5.0f} s: jobs {len(watcher.job_created)}, complete {len(watcher.job_complete)}, "
                f"runs Succeeded {len(watcher.run_succeeded)}, Rollouts Approved {approved}/{n}")
    approvers.shutdown(wait=True)
    elapsed = time.monotonic() - start
    watcher.stop()
    requests1, cpu1 = operator_requests(), op.cpu_seconds()
    metrics = {} if op.baseline else op.metrics()
    peak = op.peak_rss_mb()
    op.stop()
    text = op.log_path.read_text(errors="replace")
    bad = [line for line in text.splitlines()
           if re.search(r"\b5\d\d\b.*(Internal Server Error|Service Unavailable|Gateway)|Client\.Timeout|failed calling webhook", line)]
    buckets = {float(dict(labels)["le"]): v for (name, labels), v in metrics.items()
               if name == "rlops_admission_review_duration_seconds_bucket"}
    to_job = [watcher.job_created[k] - t for k, t in applied.items() if k in watcher.job_created]
    to_done = [watcher.run_succeeded[k] - t for k, t in watcher.job_complete.items() if k in watcher.run_succeeded]
    approved = sum(1 for p in watcher.rollout_phase.values() if p == "Approved")
    result = {
        "controller": "baseline" if op.baseline else "rlops", "agents": n, "tree": str(op.tree), "seconds": round(elapsed, 1), "jobs": len(watcher.job_created),
        "runs_succeeded": len(watcher.run_succeeded), "rollouts_approved": approved,
        "apply_to_job_p50": quantile(to_job, 0.5), "apply_to_job_p99": quantile(to_job, 0.99),
        "job_complete_to_succeeded_p50": quantile(to_done, 0.5), "job_complete_to_succeeded_p99": quantile(to_done, 0.99),
        "operator_cpu_seconds": round(cpu1 - cpu0, 1), "operator_peak_rss_mb": round(peak, 1),
        "api_requests_per_agent": round((requests1["regular"] - requests0["regular"] - background * elapsed) / n, 2),
        "api_requests_per_agent_raw": round((requests1["regular"] - requests0["regular"]) / n, 2),
        "api_background_per_second": round(background, 2),
        "api_watches": requests1["watch"] - requests0["watch"],
        "approvals": len(approvals), "approval_failures": len(approval_failures),
        "approval_p50": quantile(approvals, 0.5), "approval_p99": quantile(approvals, 0.99),
        "webhook_p99_server": histogram_quantile(buckets, 0.99),
        "operator_log_5xx_or_timeouts": len(bad),
    }
    for line in (approval_failures[:3] + bad[:3]):
        log(f"  e.g. {line[:300]}")
    return result


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose operator, CRDs and RBAC run")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per size before giving up")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the last size's cluster")
    ap.add_argument("--breakdown", action="store_true",
                    help="also count the operator's requests by client, verb and kind (hack/bench/count_requests.py)")
    ap.add_argument("--baseline", action="store_true",
                    help="each size also with the least controller (hack/bench/minimal_controller.py, in its own "
                         "cluster, before the operator): the machine's floor for the same latencies, and the ratio")
    args = ap.parse_args()
    results = []
    workroot = CACHE / "bench-scale"
    for i, n in enumerate(args.agents):
        workdir = workroot / f"{n}"
        workdir.mkdir(parents=True, exist_ok=True)
        floor = None
        if args.baseline:
            cluster_down()
            try:
                floor = run_once(n, args.tree.resolve(), workdir, args.timeout, baseline=True)
            finally:
                cluster_down()
            log(json.dumps(floor))
            results.append(floor)
        cluster_down()
        try:
            results.append(run_once(n, args.tree.resolve(), workdir, args.timeout, args.breakdown))
        finally:
            if not (args.keep and i == len(args.agents) - 1):
                cluster_down()
        log(json.dumps(results[-1]))
        if floor is not None:
            for key in ("apply_to_job_p50", "apply_to_job_p99", "job_complete_to_succeeded_p50",
                        "job_complete_to_succeeded_p99", "operator_cpu_seconds", "api_requests_per_agent"):
                if floor.get(key) and results[-1].get(key) is not None:
                    log(f"{n} agents: {key} rlops / baseline = {results[-1][key] / floor[key]:.1f}")
    cols = [c for c in results[0] if c != "requests_per_agent_by_kind"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        print("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
