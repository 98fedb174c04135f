#!/usr/bin/env python3
"""rlops node agent: a dev/test-only stand-in for a kubelet.

It registers a GPU-looking Node, keeps it Ready (node status + Lease heartbeats), and runs the
pods bound to that node as local processes (the container's command + args + env), reporting
their status back through the API like a kubelet. See docs/node-agent.md.

    python hack/node_agent.py --kubeconfig PATH --node-name NAME [--gpus 8] [--state-dir DIR]
                              [--path-prepend DIR]

State layout (under --state-dir, default ~/.cache/rlops/node-agent/<node-name>):

    logs/<namespace>_<pod>_<container>.log          stdout+stderr of each container
    pods/<pod-uid>/pod.json                         namespace, name, startTime, terminal status
    pods/<pod-uid>/work/                            default working directory of the pod
    pods/<pod-uid>/containers/<name>/<run>/         one directory per run (run = restartCount)
        launch.json       written by the agent just before it starts the shim (argv, log offset)
        started.json      written by the shim: pid, process start ticks, startedAt
        exit.json         written by the shim when the command ends: exitCode, finishedAt
        termination-log   the file passed as $RLOPS_TERMINATION_MESSAGE_PATH
        result.json       the final container state, written once by the agent

The filesystem is the source of truth, so a restarted agent adopts running processes and never
starts a run whose directory already shows a start.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("node-agent")

AGENT_VERSION = "0.1.0"
GPU_RESOURCE = "nvidia.com/gpu"
AGENT_LABEL = "rlops.dev/node-agent"
LOG_ANNOTATION_PREFIX = "rlops.dev/node-agent-log."
STATE_DIR_ANNOTATION = "rlops.dev/node-agent-state-dir"
TERMINATION_ENV = "RLOPS_TERMINATION_MESSAGE_PATH"
NODE_LEASE_NAMESPACE = "kube-node-lease"
HEARTBEAT_SECONDS = 10.0
# A kubelet uses 40 s. The node lifecycle controller only looks at renewTime, but kwok-controller
# (run with --manage-all-nodes=true by kwokctl) takes over -- and fakes the pods of -- any node whose
# Lease it can acquire, i.e. one whose holder let it expire. A long duration keeps kwok off this
# node even while the agent is stopped for a while (e.g. restarted); see docs/node-agent.md.
LEASE_DURATION_SECONDS = 3600
POLL_SECONDS = 0.5
MAX_GRACE_SECONDS = 30
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
MAX_BACKOFF_SECONDS = 30.0
CONFIG_RETRY_SECONDS = 5.0
LOCAL_IP = "127.0.0.1"
TERMINAL_PHASES = ("Succeeded", "Failed")
# Environment the agent passes on from its own; everything else a container sees comes from
# its pod spec (like a kubelet, which never leaks its own environment into containers).
BASE_ENV_KEYS = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")

# The shim that runs each container command. It is started in its own session (so it is the
# process-group leader the agent signals), records its pid, runs the command, and records the
# exit code when the command ends, atomically, so a restarted agent can read it later. It ignores
# SIGTERM/SIGINT/SIGHUP itself (the command in its group still receives them with default
# handling, since caught signals are reset on exec) so it always outlives the command.
SHIM = r"""
import json, os, signal, subprocess, sys, time
run, argv = sys.argv[1], sys.argv[2:]
def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
def put(name, data):
    tmp = os.path.join(run, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(run, name))
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda *_: None)
with open("/proc/self/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
put("started.json", {"pid": os.getpid(), "startTicks": ticks, "startedAt": now(), "startedEpoch": time.time()})
try:
    p = subprocess.Popen(argv)
except OSError as e:
    msg = "node agent could not start %r: %s" % (argv[0] if argv else "", e)
    print(msg, file=sys.stderr, flush=True)
    put("exit.json", {"exitCode": 128, "reason": "StartError", "message": msg,
                      "finishedAt": now(), "finishedEpoch": time.time()})
    sys.exit(128)
rc = p.wait()
code = rc if rc >= 0 else 128 - rc
put("exit.json", {"exitCode": code, "finishedAt": now(), "finishedEpoch": time.time()})
sys.exit(code & 0xFF)
"""


# ----------------------------------------------------------------------------------------------
# small helpers


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def expand(text: str, mapping: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $(NAME) -> value when defined (else left as is), $$ -> $."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end < 0:
                    out.append(text[i:])
                    break
                name = text[i + 2:end]
                out.append(mapping[name] if name in mapping else text[i:end + 1])
                i = end + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def mem_total_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 16 * 1024 * 1024


def read_first_line(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return default


def os_image() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"


def go_arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


class ConfigError(Exception):
    """A container cannot be started yet (missing secret/config map, bad fieldRef...)."""


# ----------------------------------------------------------------------------------------------
# container runs on disk


@dataclass
class Run:
    """The observed state of one run of one container."""

    index: int
    dir: Path
    status: str  # "starting" | "running" | "terminated"
    pid: int | None = None
    started_at: str | None = None
    result: dict | None = None  # for "terminated": exitCode, reason, message, startedAt, finishedAt


@dataclass
class PodView:
    """Everything tick() derived about a pod in one pass."""

    init: dict[str, Run | None] = field(default_factory=dict)
    main: dict[str, Run | None] = field(default_factory=dict)
    init_done: bool = False
    init_failed: bool = False
    phase: str = "Pending"


# ----------------------------------------------------------------------------------------------
# the agent


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.node_name: str = args.node_name
        self.gpus: int = args.gpus
        self.max_pods: int = args.max_pods
        self.state_dir = Path(args.state_dir).expanduser().resolve()
        self.path_prepend: str = args.path_prepend
        gpu_taint = [] if args.cpu_pods else [{"key": GPU_RESOURCE, "effect": "NoSchedule"}]
        self.taints: list[dict] = gpu_taint + [parse_taint(t) for t in args.taint or []]
        cfg = client.Configuration()
        config.load_kube_config(config_file=args.kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 32
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.workers: dict[str, PodWorker] = {}
        self.children: dict[int, subprocess.Popen] = {}
        self.children_lock = threading.Lock()
        self.node_uid: str | None = None
        self.ready_since = now_iso()
        self.kubelet_version = "v0.0.0"
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------------

    def pod_dir(self, uid: str) -> Path:
        return self.state_dir / "pods" / uid

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return self.state_dir / "logs" / f"{namespace}_{pod}_{container}.log"

    # -- processes -----------------------------------------------------------------------------

    def process_alive(self, pid: int, start_ticks: int | None) -> bool:
        with self.children_lock:
            child = self.children.get(pid)
            if child is not None:
                if child.poll() is None:
                    return True
                del self.children[pid]  # reaped
                return False
        info = proc_stat(pid)
        if info is None:
            return False
        state, ticks = info
        if start_ticks is not None and ticks != start_ticks:
            return False  # the pid was reused
        return state not in ("Z", "X")

    def spawn(self, argv: list[str], cwd: str, env: dict[str, str], log_file: Path) -> int:
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        with self.children_lock:
            self.children[proc.pid] = proc
        return proc.pid

    # -- node ----------------------------------------------------------------------------------

    def labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": go_arch(),
            "nvidia.com/gpu.present": "true",
            AGENT_LABEL: "true",
        }

    def resources(self) -> dict[str, str]:
        return {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{mem_total_kib()}Ki",
            "ephemeral-storage": str(shutil.disk_usage(self.state_dir).total),
            "pods": str(self.max_pods),
            GPU_RESOURCE: str(self.gpus),
        }

    def conditions(self) -> list[dict]:
        hb = now_iso()

        def cond(type_: str, status: str, reason: str, message: str) -> dict:
            return {"type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": hb, "lastTransitionTime": self.ready_since}

        return [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                 "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status (rlops node agent)"),
        ]

    def node_status(self) -> dict:
        res = self.resources()
        return {
            "capacity": res,
            "allocatable": dict(res),
            "conditions": self.conditions(),
            "addresses": [{"type": "InternalIP", "address": LOCAL_IP},
                          {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {
                "machineID": read_first_line("/etc/machine-id"),
                "systemUUID": read_first_line("/etc/machine-id"),
                "bootID": read_first_line("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": os_image(),
                "containerRuntimeVersion": f"rlops-node-agent://{AGENT_VERSION}",
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": go_arch(),
            },
        }

    def register_node(self) -> None:
        try:
            self.kubelet_version = client.VersionApi(self.api).get_code().git_version
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        annotations = {STATE_DIR_ANNOTATION: str(self.state_dir), "node.alpha.kubernetes.io/ttl": "0"}
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node_name, "labels": self.labels(), "annotations": annotations},
            "spec": {"taints": self.taints},
            "status": self.node_status(),
        }
        try:
            node = self.core.create_node(body)
            log.info("registered node %s", self.node_name)
        except ApiException as e:
            if e.status != 409:
                raise
            existing = self.core.read_node(self.node_name)
            taints = [self.api.sanitize_for_serialization(t) for t in (existing.spec.taints or [])]
            ours = {t["key"] for t in self.taints}
            taints = [t for t in taints if t.get("key") not in ours] + self.taints
            node = self.core.patch_node(self.node_name, {
                "metadata": {"labels": self.labels(), "annotations": annotations},
                "spec": {"taints": taints},
            })
            log.info("updated existing node %s", self.node_name)
        self.node_uid = node.metadata.uid
        self.core.patch_node_status(self.node_name, {"status": self.node_status()})

    def renew_lease(self) -> None:
        """Create or renew the node's Lease, always as its holder (see LEASE_DURATION_SECONDS)."""
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                "renewTime": now_micro()}
        meta: dict[str, Any] = {}
        if self.node_uid:
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": self.node_name,
                                        "uid": self.node_uid}]
        try:
            self.coord.patch_namespaced_lease(self.node_name, NODE_LEASE_NAMESPACE,
                                              {"metadata": meta, "spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            meta.update(name=self.node_name, namespace=NODE_LEASE_NAMESPACE)
            self.coord.create_namespaced_lease(NODE_LEASE_NAMESPACE, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec})
            log.info("created lease %s/%s", NODE_LEASE_NAMESPACE, self.node_name)

    def heartbeat_loop(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                try:
                    self.core.patch_node_status(self.node_name, {"status": {"conditions": self.conditions()}})
                except ApiException as e:
                    if e.status != 404:
                        raise
                    log.warning("node %s is gone; registering it again", self.node_name)
                    self.register_node()
                self.renew_lease()
                log.debug("heartbeat sent")
            except Exception as e:  # noqa: BLE001 - keep beating
                log.warning("heartbeat failed: %s", e)

    # -- pods ----------------------------------------------------------------------------------

    def watch_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        rv: str | None = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
                    rv = pods.metadata.resource_version
                    self.sync(pods.items)
                w = watch.Watch()
                for ev in w.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                   resource_version=rv, timeout_seconds=60, allow_watch_bookmarks=True,
                                   _request_timeout=90):
                    if self.stop.is_set():
                        w.stop()
                        break
                    if ev["type"] == "BOOKMARK":
                        rv = ev["raw_object"]["metadata"]["resourceVersion"]
                        continue
                    pod = ev["object"]
                    rv = pod.metadata.resource_version
                    self.handle(ev["type"], pod)
            except ApiException as e:
                if e.status == 410:
                    log.info("pod watch expired (410); listing again")
                else:
                    log.warning("pod watch failed: %s %s; listing again", e.status, e.reason)
                    self.stop.wait(2)
                rv = None
            except Exception as e:  # noqa: BLE001 - keep watching
                log.warning("pod watch failed: %s; listing again", e)
                rv = None
                self.stop.wait(2)

    def sync(self, pods: list) -> None:
        """Handle a full list: every pod, then the ones we know of that are gone."""
        seen = set()
        for pod in pods:
            seen.add(pod.metadata.uid)
            self.handle("SYNC", pod)
        with self.lock:
            known = set(self.workers) | {p.name for p in (self.state_dir / "pods").iterdir() if p.is_dir()}
        for uid in known - seen:
            self.handle_gone(uid)

    def handle(self, kind: str, pod) -> None:
        uid = pod.metadata.uid
        if kind == "DELETED":
            self.handle_gone(uid, pod)
            return
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            terminal = pod.status is not None and pod.status.phase in TERMINAL_PHASES
            if terminal and pod.metadata.deletion_timestamp is None:
                return  # finished; nothing to run, nothing to finalize yet
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def handle_gone(self, uid: str, pod=None) -> None:
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.mark_gone()
                return
            if not self.pod_dir(uid).is_dir():
                return
            worker = PodWorker(self, pod, uid=uid, gone=True)
            self.workers[uid] = worker
        worker.start()

    def worker_done(self, worker: PodWorker) -> bool:
        """Called by a worker that wants to exit; False if it got news meanwhile and must go on."""
        with self.lock:
            if worker.dirty:
                return False
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
            return True

    def event(self, pod, reason: str, message: str, type_: str = "Normal") -> None:
        """Best-effort core/v1 Event about a pod, as a kubelet would emit."""
        if pod is None:
            return
        ts = now_iso()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod.metadata.name}.", "namespace": pod.metadata.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name,
                               "namespace": pod.metadata.namespace, "uid": pod.metadata.uid},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": "rlops-node-agent", "host": self.node_name},
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        }
        try:
            self.core.create_namespaced_event(pod.metadata.namespace, body)
        except Exception as e:  # noqa: BLE001 - events are cosmetic
            log.debug("could not record event %s: %s", reason, e)

    # -- main ----------------------------------------------------------------------------------

    def run(self) -> None:
        log.info("node agent %s starting: node=%s gpus=%d state=%s PATH prefix=%s",
                 AGENT_VERSION, self.node_name, self.gpus, self.state_dir, self.path_prepend)
        while True:
            try:
                self.renew_lease()  # before the node exists, so kwok-controller never grabs it
                self.register_node()
                self.renew_lease()  # again, now owned by the node (garbage-collected with it)
                break
            except Exception as e:  # noqa: BLE001 - the API server may not be up yet
                if self.stop.is_set():
                    return
                log.warning("could not register node %s (%s); retrying", self.node_name, e)
                self.stop.wait(3)
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.watch_loop, name="pod-watch", daemon=True).start()
        while not self.stop.wait(1.0):
            pass
        log.info("node agent stopping; heartbeats stop, container processes keep running "
                 "(a restarted agent adopts them)")


# ----------------------------------------------------------------------------------------------
# one pod


class PodWorker(threading.Thread):
    def __init__(self, agent: Agent, pod, uid: str | None = None, gone: bool = False):
        if pod is not None:
            key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        else:
            meta = read_json(agent.pod_dir(uid) / "pod.json") or {}
            key = f"{meta['namespace']}/{meta['name']}" if "name" in meta else uid
        super().__init__(name=f"pod:{key}", daemon=True)
        self.key = key
        self.agent = agent
        self.pod = pod
        self.uid = uid or pod.metadata.uid
        self.dir = agent.pod_dir(self.uid)
        self.wake = threading.Event()
        self.dirty = False
        self.gone = gone
        self.finished = False
        self.last_status: dict | None = None
        self.cond_times: dict[str, tuple[str, str]] = {}
        self.config_retry: dict[str, float] = {}
        self.config_error: dict[str, str] = {}
        self.seen_alive: set[Path] = set()
        self.launching: dict[Path, int] = {}  # run dir -> shim pid, until started.json shows up
        self.deleting = False
        status = pod.status if pod is not None else None
        for cond in (status.conditions or []) if status is not None else []:
            if cond.last_transition_time is not None:
                self.cond_times[cond.type] = (cond.status, fmt_time(cond.last_transition_time))

    # -- plumbing ------------------------------------------------------------------------------

    def update(self, pod) -> None:
        self.pod = pod
        self.dirty = True
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.dirty = True
        self.wake.set()

    def run(self) -> None:
        while True:
            self.dirty = False
            try:
                done = self.tick()
            except Exception:  # noqa: BLE001 - never let one pod kill the agent
                log.exception("pod %s: unexpected error; retrying", self.key)
                done = False
                self.wake.wait(2)
            if done and self.agent.worker_done(self):
                return
            self.wake.wait(POLL_SECONDS)
            self.wake.clear()

    # -- spec helpers --------------------------------------------------------------------------

    @property
    def spec(self):
        return self.pod.spec

    @property
    def policy(self) -> str:
        return self.spec.restart_policy or "Always"

    def grace_seconds(self) -> int:
        pod = self.pod
        if pod is None:
            meta = read_json(self.dir / "pod.json") or {}
            return min(int(meta.get("grace", MAX_GRACE_SECONDS)), MAX_GRACE_SECONDS)
        grace = pod.metadata.deletion_grace_period_seconds
        if grace is None:
            grace = pod.spec.termination_grace_period_seconds
        if grace is None:
            grace = 30
        return max(0, min(int(grace), MAX_GRACE_SECONDS))

    def container_dir(self, name: str) -> Path:
        return self.dir / "containers" / name

    # -- the state machine ---------------------------------------------------------------------

    def tick(self) -> bool:
        """One pass: observe, act, report. True when this worker has nothing more to do."""
        if self.gone:
            self.stop_processes(self.grace_seconds(), why="pod is gone")
            shutil.rmtree(self.dir, ignore_errors=True)
            log.info("pod %s: gone; local state removed", self.key)
            return True
        if self.pod.metadata.deletion_timestamp is not None:
            return self.finalize_deletion()
        if self.finished:
            return True
        if not (self.dir / "pod.json").exists():
            self.setup()
        meta = read_json(self.dir / "pod.json") or {}
        if meta.get("terminal"):
            # Already finished here; (re)report the final status if the API lags behind.
            if self.pod.status is None or self.pod.status.phase not in TERMINAL_PHASES:
                self.patch_status(meta["terminal"])
            self.finished = True
            return True
        if self.pod.status is not None and self.pod.status.phase in TERMINAL_PHASES:
            self.finished = True  # terminal in the API (e.g. finished before a state-dir loss)
            return True

        view = self.observe()
        if self.deadline_exceeded(meta, view):
            self.deleting = True  # nothing restarts any more
            self.stop_processes(self.grace_seconds(), why="active deadline exceeded")
            view = self.observe()
            view.phase = "Failed"
            status = self.build_status(view)
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        else:
            self.act(view)
            view = self.observe()
            status = self.build_status(view)
        if status != self.last_status:
            if not self.patch_status(status):
                return False
            if status["phase"] != (self.last_status or {}).get("phase"):
                log.info("pod %s: phase %s", self.key, status["phase"])
            self.last_status = status
        if status["phase"] in TERMINAL_PHASES:
            meta["terminal"] = status
            write_json(self.dir / "pod.json", meta)
            self.finished = True
            return True
        return False

    def deadline_exceeded(self, meta: dict, view: PodView) -> bool:
        """spec.activeDeadlineSeconds, counted from the pod's startTime, as the kubelet does."""
        deadline = self.spec.active_deadline_seconds
        if deadline is None or view.phase in TERMINAL_PHASES or not meta.get("startTime"):
            return False
        started = dt.datetime.strptime(meta["startTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        return time.time() - started.timestamp() >= deadline

    def setup(self) -> None:
        """First sight of a pod on this agent: state dir, log annotations, adopt API history."""
        pod = self.pod
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "work").mkdir(exist_ok=True)
        start_time = now_iso()
        if pod.status is not None and pod.status.start_time is not None:
            start_time = fmt_time(pod.status.start_time)
        self.import_api_history()
        annotations = {}
        for c in list(pod.spec.init_containers or []) + list(pod.spec.containers):
            annotations[LOG_ANNOTATION_PREFIX + c.name] = str(
                self.agent.log_path(pod.metadata.namespace, pod.metadata.name, c.name))
        try:
            self.agent.core.patch_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                                 {"metadata": {"annotations": annotations}})
        except ApiException as e:
            log.warning("pod %s: could not annotate log paths: %s %s", self.key, e.status, e.reason)
        write_json(self.dir / "pod.json", {
            "namespace": pod.metadata.namespace, "name": pod.metadata.name, "uid": self.uid,
            "startTime": start_time, "grace": self.grace_seconds(),
        })
        log.info("pod %s: accepted (uid %s)", self.key, self.uid)

    def import_api_history(self) -> None:
        """No local state but the API says containers ran: never run them again.

        Containers the API shows terminated keep that result; ones it shows running (started by an
        agent whose state dir is lost) are marked terminated with reason NodeAgentLost.
        """
        status = self.pod.status
        if status is None:
            return
        for cs in list(status.init_container_statuses or []) + list(status.container_statuses or []):
            state = cs.state
            if state is None or (state.running is None and state.terminated is None):
                continue
            rundir = self.container_dir(cs.name) / str(cs.restart_count or 0)
            rundir.mkdir(parents=True, exist_ok=True)
            if state.terminated is not None:
                t = state.terminated
                result = {"exitCode": t.exit_code, "reason": t.reason or "", "message": t.message or "",
                          "startedAt": fmt_time(t.started_at) if t.started_at else None,
                          "finishedAt": fmt_time(t.finished_at) if t.finished_at else now_iso(),
                          "finishedEpoch": time.time()}
            else:
                started = state.running.started_at
                result = self.lost_result(fmt_time(started) if started else None,
                                          "the API shows this container running but the node agent "
                                          "has no record of it (state dir lost?)")
                log.warning("pod %s: container %s marked NodeAgentLost", self.key, cs.name)
            write_json(rundir / "result.json", result)

    @staticmethod
    def lost_result(started_at: str | None, message: str) -> dict:
        return {"exitCode": 137, "reason": "NodeAgentLost", "message": message,
                "startedAt": started_at, "finishedAt": now_iso(), "finishedEpoch": time.time()}

    def current_run(self, name: str, container=None) -> Run | None:
        """Observe the newest run of a container from its run directory."""
        cdir = self.container_dir(name)
        try:
            indexes = [int(p) for p in os.listdir(cdir) if p.isdigit()]
        except FileNotFoundError:
            return None
        if not indexes:
            return None
        index = max(indexes)
        rundir = cdir / str(index)
        result = read_json(rundir / "result.json")
        if result is not None:
            return Run(index, rundir, "terminated", result=result, started_at=result.get("startedAt"))
        started = read_json(rundir / "started.json")
        launch = read_json(rundir / "launch.json")
        if started is None:
            pid = self.launching.get(rundir)
            if pid is None:
                # Not launched (a config error is pending), or launched by an earlier agent that
                # died before the shim recorded its start: nothing ran, starting over is safe.
                if launch is not None:
                    (rundir / "launch.json").unlink(missing_ok=True)
                return self.previous_as_current(name, index)
            if self.agent.process_alive(pid, None):
                return Run(index, rundir, "starting", pid=pid)
            started = read_json(rundir / "started.json")  # it may have written it meanwhile
            if started is None:
                self.launching.pop(rundir, None)
                result = {"exitCode": 128, "reason": "StartError",
                          "message": "the node agent's shim exited before starting the command "
                                     f"(see {self.log_of(name)})",
                          "startedAt": None, "finishedAt": now_iso(), "finishedEpoch": time.time()}
                return self.finish_run(container, rundir, index, result, launch)
        pid = started["pid"]
        if self.agent.process_alive(pid, started.get("startTicks")):
            self.launching.pop(rundir, None)
            self.seen_alive.add(rundir)
            return Run(index, rundir, "running", pid=pid, started_at=started["startedAt"])
        self.launching.pop(rundir, None)
        exited = read_json(rundir / "exit.json")
        if exited is None:
            result = self.lost_result(started["startedAt"],
                                      f"process {pid} is gone without an exit code "
                                      "(killed while the node agent was not watching?)")
            log.warning("pod %s: container %s lost (pid %d gone, no exit code)", self.key, name, pid)
        else:
            result = {"exitCode": exited["exitCode"],
                      "reason": exited.get("reason") or ("Completed" if exited["exitCode"] == 0 else "Error"),
                      "message": exited.get("message", ""), "startedAt": started["startedAt"],
                      "finishedAt": exited["finishedAt"], "finishedEpoch": exited.get("finishedEpoch", time.time())}
        if rundir in self.seen_alive:
            # like a container's PID namespace ending: whatever it left behind in its group goes too
            kill_group(pid, signal.SIGKILL)
            self.seen_alive.discard(rundir)
        return self.finish_run(container, rundir, index, result, launch)

    def previous_as_current(self, name: str, index: int) -> Run | None:
        """A run directory that never started: report the previous run meanwhile."""
        if index == 0:
            return None
        prev = read_json(self.container_dir(name) / str(index - 1) / "result.json")
        if prev is None:
            return None
        return Run(index - 1, self.container_dir(name) / str(index - 1), "terminated", result=prev)

    def log_of(self, name: str) -> Path:
        return self.agent.log_path(self.pod.metadata.namespace, self.pod.metadata.name, name)

    def finish_run(self, container, rundir: Path, index: int, result: dict, launch: dict | None) -> Run:
        """Fill in the termination message and persist the final result of a run."""
        if not result.get("message"):
            result["message"] = self.termination_message(container, rundir, result["exitCode"], launch)
        write_json(rundir / "result.json", result)
        log.info("pod %s: container %s run %d terminated: exit %s (%s)", self.key, rundir.parent.name,
                 index, result["exitCode"], result["reason"])
        return Run(index, rundir, "terminated", result=result, started_at=result.get("startedAt"))

    def termination_message(self, container, rundir: Path, exit_code: int, launch: dict | None) -> str:
        message = b""
        try:
            with open(rundir / "termination-log", "rb") as f:
                message = f.read(MAX_TERMINATION_MESSAGE_BYTES)
        except OSError:
            pass
        policy = (container.termination_message_policy if container is not None else None) or "File"
        if not message and exit_code != 0 and policy == "FallbackToLogsOnError" and launch:
            message = self.log_tail(Path(launch["log"]), int(launch.get("logOffset", 0)))
        return message.decode("utf-8", errors="replace")

    @staticmethod
    def log_tail(path: Path, offset: int) -> bytes:
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(offset, size - 256 * 1024)
                f.seek(start)
                data = f.read()
        except OSError:
            return b""
        lines = data.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        return b"".join(lines)[-FALLBACK_LOG_BYTES:]

    def observe(self) -> PodView:
        view = PodView()
        spec = self.spec
        for c in spec.init_containers or []:
            view.init[c.name] = self.current_run(c.name, c)
        for c in spec.containers:
            view.main[c.name] = self.current_run(c.name, c)
        # init containers: done when each has a run that exited 0
        view.init_done = all(r is not None and r.status == "terminated" and r.result["exitCode"] == 0
                             for r in view.init.values())
        if not view.init_done and self.policy == "Never":
            view.init_failed = any(r is not None and r.status == "terminated" and r.result["exitCode"] != 0
                                   for r in view.init.values())
        view.phase = self.phase(view)
        return view

    def phase(self, view: PodView) -> str:
        if view.init_failed:
            return "Failed"
        if not view.init_done:
            return "Pending"
        runs = list(view.main.values())
        if any(r is None for r in runs):
            return "Pending"  # some container has not started yet
        if any(r.status == "running" or (r.status == "starting" and r.index > 0) for r in runs):
            return "Running"
        if any(r.status == "starting" for r in runs):
            return "Pending"
        codes = [r.result["exitCode"] for r in runs]
        if self.policy == "Never":
            return "Succeeded" if all(c == 0 for c in codes) else "Failed"
        if self.policy == "OnFailure":
            return "Succeeded" if all(c == 0 for c in codes) else "Running"
        return "Running"  # Always: everything restarts

    def should_restart(self, run: Run) -> bool:
        if self.policy == "Never" or self.deleting:
            return False
        if self.policy == "OnFailure":
            return run.result["exitCode"] != 0
        return True

    @staticmethod
    def backoff_left(run: Run) -> float:
        delay = min(MAX_BACKOFF_SECONDS, 1.0 * (2 ** run.index))
        return run.result.get("finishedEpoch", 0) + delay - time.time()

    def act(self, view: PodView) -> None:
        if view.phase in TERMINAL_PHASES:
            return
        if not view.init_done:
            for c in self.spec.init_containers or []:
                run = view.init[c.name]
                if run is not None and run.status == "terminated" and run.result["exitCode"] == 0:
                    continue
                if run is None:
                    self.start_container(c, 0)
                elif run.status == "terminated" and self.should_restart(run) and self.backoff_left(run) <= 0:
                    self.start_container(c, run.index + 1)
                return  # init containers run one at a time, in order
            return
        for c in self.spec.containers:
            run = view.main[c.name]
            if run is None:
                self.start_container(c, 0)
            elif run.status == "terminated" and self.should_restart(run) and self.backoff_left(run) <= 0:
                self.start_container(c, run.index + 1)

    # -- starting a container ------------------------------------------------------------------

    def start_container(self, c, index: int) -> None:
        if time.time() < self.config_retry.get(c.name, 0):
            return
        pod = self.pod
        rundir = self.container_dir(c.name) / str(index)
        if (rundir / "started.json").exists() or (rundir / "result.json").exists():
            return  # already ran (never twice)
        rundir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_of(c.name)
        if not c.command:
            result = {"exitCode": 128, "reason": "NodeAgentNoCommand",
                      "message": "the rlops node agent runs no images: container "
                                 f"{c.name!r} needs spec.containers[].command",
                      "startedAt": None, "finishedAt": now_iso(), "finishedEpoch": time.time()}
            write_json(rundir / "result.json", result)
            log.warning("pod %s: container %s has no command; failed", self.key, c.name)
            self.agent.event(pod, "Failed", result["message"], "Warning")
            return
        try:
            env, pod_env = self.build_env(c)
        except ConfigError as e:
            if self.config_error.get(c.name) != str(e):
                log.warning("pod %s: container %s cannot start yet: %s", self.key, c.name, e)
                self.agent.event(pod, "Failed", f"Error: {e}", "Warning")
            self.config_error[c.name] = str(e)
            self.config_retry[c.name] = time.time() + CONFIG_RETRY_SECONDS
            return
        self.config_error.pop(c.name, None)
        term_file = rundir / "termination-log"
        term_file.write_bytes(b"")
        env[TERMINATION_ENV] = str(term_file)
        argv = [expand(a, pod_env) for a in list(c.command) + list(c.args or [])]
        cwd = c.working_dir if c.working_dir and os.path.isdir(c.working_dir) else str(self.dir / "work")
        if index == 0:
            log_file.write_bytes(b"")  # a new pod (maybe with a recycled name): a fresh log
        offset = log_file.stat().st_size if log_file.exists() else 0
        write_json(rundir / "launch.json", {"argv": argv, "cwd": cwd, "log": str(log_file), "logOffset": offset})
        shim = [sys.executable, "-I", "-S", "-c", SHIM, str(rundir)] + argv
        try:
            pid = self.agent.spawn(shim, cwd, env, log_file)
        except OSError as e:
            result = {"exitCode": 128, "reason": "StartError", "message": f"node agent could not start the shim: {e}",
                      "startedAt": None, "finishedAt": now_iso(), "finishedEpoch": time.time()}
            write_json(rundir / "result.json", result)
            return
        self.launching[rundir] = pid
        deadline = time.monotonic() + 2
        while not (rundir / "started.json").exists() and time.monotonic() < deadline:
            if not self.agent.process_alive(pid, None):
                break
            time.sleep(0.01)
        log.info("pod %s: started container %s run %d (pid %d): %s", self.key, c.name, index, pid,
                 " ".join(argv)[:300])
        self.agent.event(pod, "Started", f"Started container {c.name} (pid {pid}, rlops node agent)")

    def build_env(self, c) -> tuple[dict[str, str], dict[str, str]]:
        """(full process env, the env the pod spec defines, used for $(VAR) expansion)."""
        pod = self.pod
        ns = pod.metadata.namespace
        pod_env: dict[str, str] = {}
        for src in c.env_from or []:
            prefix = src.prefix or ""
            if src.config_map_ref is not None:
                data = self.read_config_map(ns, src.config_map_ref.name, src.config_map_ref.optional)
                for k, v in (data or {}).items():
                    pod_env[prefix + k] = v
            if src.secret_ref is not None:
                data = self.read_secret(ns, src.secret_ref.name, src.secret_ref.optional)
                for k, v in (data or {}).items():
                    pod_env[prefix + k] = v
        for var in c.env or []:
            if var.value_from is None:
                pod_env[var.name] = expand(var.value or "", pod_env)
                continue
            value = self.env_value_from(c, var.name, var.value_from)
            if value is not None:
                pod_env[var.name] = value
        env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        env["PATH"] = os.pathsep.join(p for p in (self.agent.path_prepend, os.environ.get("PATH", "")) if p)
        env["HOSTNAME"] = pod.spec.hostname or pod.metadata.name
        env.update(pod_env)
        return env, pod_env

    def env_value_from(self, c, name: str, src) -> str | None:
        pod = self.pod
        if src.field_ref is not None:
            return self.field_value(src.field_ref.field_path)
        if src.resource_field_ref is not None:
            return self.resource_value(c, src.resource_field_ref)
        if src.secret_key_ref is not None:
            ref = src.secret_key_ref
            data = self.read_secret(pod.metadata.namespace, ref.name, ref.optional)
            if data is None or ref.key not in data:
                if ref.optional:
                    return None
                raise ConfigError(f"couldn't find key {ref.key} in Secret {pod.metadata.namespace}/{ref.name}")
            return data[ref.key]
        if src.config_map_key_ref is not None:
            ref = src.config_map_key_ref
            data = self.read_config_map(pod.metadata.namespace, ref.name, ref.optional)
            if data is None or ref.key not in data:
                if ref.optional:
                    return None
                raise ConfigError(f"couldn't find key {ref.key} in ConfigMap {pod.metadata.namespace}/{ref.name}")
            return data[ref.key]
        raise ConfigError(f"env {name}: unsupported valueFrom")

    def field_value(self, path: str) -> str:
        meta, spec = self.pod.metadata, self.pod.spec
        simple = {
            "metadata.name": meta.name, "metadata.namespace": meta.namespace, "metadata.uid": meta.uid,
            "spec.nodeName": spec.node_name, "spec.serviceAccountName": spec.service_account_name or "",
            "status.podIP": LOCAL_IP, "status.podIPs": LOCAL_IP, "status.hostIP": LOCAL_IP,
            "status.hostIPs": LOCAL_IP,
        }
        if path in simple:
            return simple[path] or ""
        for prefix, values in (("metadata.labels", meta.labels), ("metadata.annotations", meta.annotations)):
            if path.startswith(prefix + "[") and path.endswith("]"):
                key = path[len(prefix) + 1:-1].strip("'\"")
                return (values or {}).get(key, "")
        raise ConfigError(f"unsupported fieldRef {path!r}")

    def resource_value(self, c, ref) -> str:
        from kubernetes.utils import parse_quantity

        resource = ref.resource
        kind, _, res = resource.partition(".")
        values = getattr(c.resources, kind, None) if c.resources is not None else None
        raw = (values or {}).get(res)
        if raw is None and kind == "requests":
            raw = ((c.resources.limits if c.resources is not None else None) or {}).get(res)
        if raw is None:
            raw = self.agent.resources().get(res)
        if raw is None:
            raise ConfigError(f"unsupported resourceFieldRef {resource!r}")
        divisor = parse_quantity(ref.divisor or "1")
        if divisor == 0:
            divisor = parse_quantity("1")
        return str(int(math.ceil(parse_quantity(raw) / divisor)))

    def read_secret(self, ns: str, name: str, optional: bool | None) -> dict[str, str] | None:
        try:
            secret = self.agent.core.read_namespaced_secret(name, ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise ConfigError(f"secret {name!r} not found" if e.status == 404 else
                              f"reading secret {name!r}: {e.status} {e.reason}") from None
        out = {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in (secret.data or {}).items()}
        out.update(secret.string_data or {})
        return out

    def read_config_map(self, ns: str, name: str, optional: bool | None) -> dict[str, str] | None:
        try:
            cm = self.agent.core.read_namespaced_config_map(name, ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise ConfigError(f"configmap {name!r} not found" if e.status == 404 else
                              f"reading configmap {name!r}: {e.status} {e.reason}") from None
        return dict(cm.data or {})

    # -- status --------------------------------------------------------------------------------

    def condition(self, type_: str, ok: bool, reason: str | None = None, message: str | None = None) -> dict:
        status = "True" if ok else "False"
        prev = self.cond_times.get(type_)
        when = prev[1] if prev is not None and prev[0] == status else now_iso()
        self.cond_times[type_] = (status, when)
        out = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": when}
        if reason:
            out["reason"] = reason
        if message:
            out["message"] = message
        return out

    def container_status(self, c, run: Run | None, waiting_reason: str, is_init: bool) -> dict:
        out: dict[str, Any] = {"name": c.name, "image": c.image or "", "imageID": "", "ready": False,
                               "restartCount": 0, "started": False, "lastState": {}}
        if run is None:
            waiting: dict[str, str] = {"reason": waiting_reason}
            if c.name in self.config_error:
                waiting = {"reason": "CreateContainerConfigError", "message": self.config_error[c.name]}
            out["state"] = {"waiting": waiting}
            return out
        out["restartCount"] = run.index
        if run.index > 0:
            prev = read_json(self.container_dir(c.name) / str(run.index - 1) / "result.json")
            if prev is not None:
                out["lastState"] = {"terminated": self.terminated(prev, run.index - 1)}
        if run.status == "starting":
            out["state"] = {"waiting": {"reason": "ContainerCreating"}}
        elif run.status == "running":
            out["containerID"] = f"rlops-node-agent://{run.pid}"
            out["state"] = {"running": {"startedAt": run.started_at}}
            out["ready"] = not is_init
            out["started"] = True
        else:
            result = run.result
            if self.should_restart(run):
                left = max(0, int(self.backoff_left(run)))
                out["lastState"] = {"terminated": self.terminated(result, run.index)}
                out["state"] = {"waiting": {"reason": "CrashLoopBackOff",
                                            "message": f"back-off {left}s restarting failed container={c.name}"}}
            else:
                out["state"] = {"terminated": self.terminated(result, run.index)}
                out["ready"] = is_init and result["exitCode"] == 0
        return out

    def terminated(self, result: dict, index: int) -> dict:
        t = {"exitCode": result["exitCode"], "reason": result.get("reason") or "Error",
             "startedAt": result.get("startedAt") or result.get("finishedAt"),
             "finishedAt": result.get("finishedAt")}
        if result.get("message"):
            t["message"] = result["message"]
        return t

    def build_status(self, view: PodView) -> dict:
        spec = self.spec
        meta = read_json(self.dir / "pod.json") or {}
        phase = view.phase
        terminal = phase in TERMINAL_PHASES
        init_statuses = [self.container_status(c, view.init[c.name], "PodInitializing", True)
                         for c in spec.init_containers or []]
        main_statuses = [self.container_status(c, view.main[c.name],
                                               "ContainerCreating" if view.init_done else "PodInitializing",
                                               False)
                         for c in spec.containers]
        if terminal:
            # a finished pod: no container is ready any more
            for s in main_statuses:
                s["ready"] = False
        not_ready = [s["name"] for s in main_statuses if not s["ready"]]
        incomplete = [c.name for c in spec.init_containers or []
                      if not (view.init[c.name] is not None and view.init[c.name].status == "terminated"
                              and view.init[c.name].result["exitCode"] == 0)]
        if terminal:
            ready_reason, ready_msg = "PodCompleted", None
        elif not_ready:
            ready_reason, ready_msg = "ContainersNotReady", f"containers with unready status: [{' '.join(not_ready)}]"
        else:
            ready_reason, ready_msg = None, None
        conditions = [
            self.condition("PodReadyToStartContainers", True),
            self.condition("Initialized", view.init_done,
                           None if view.init_done else "ContainersNotInitialized",
                           None if view.init_done else f"containers with incomplete status: [{' '.join(incomplete)}]"),
            self.condition("Ready", not not_ready and not terminal, ready_reason, ready_msg),
            self.condition("ContainersReady", not not_ready and not terminal, ready_reason, ready_msg),
            self.condition("PodScheduled", True),
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": LOCAL_IP, "hostIPs": [{"ip": LOCAL_IP}],
            "podIP": LOCAL_IP, "podIPs": [{"ip": LOCAL_IP}],
            "startTime": meta.get("startTime") or now_iso(),
            "containerStatuses": main_statuses,
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        return status

    def patch_status(self, status: dict) -> bool:
        pod = self.pod
        try:
            self.agent.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace,
                                                        {"status": status})
            return True
        except ApiException as e:
            if e.status == 404:
                self.gone = True
                self.wake.set()
                return False
            log.warning("pod %s: status update failed: %s %s %s", self.key, e.status, e.reason,
                        (e.body or "")[:500])
            self.wake.wait(2)
            return False

    # -- stopping ------------------------------------------------------------------------------

    def live_runs(self) -> list[tuple[Path, int, int | None]]:
        """(run dir, pid, start ticks) of every run of this pod that may still have a process."""
        out = []
        cdirs = self.dir / "containers"
        if not cdirs.is_dir():
            return out
        for cdir in cdirs.iterdir():
            indexes = [int(p) for p in os.listdir(cdir) if p.isdigit()]
            if not indexes:
                continue
            rundir = cdir / str(max(indexes))
            if (rundir / "result.json").exists():
                continue
            started = read_json(rundir / "started.json")
            if started is not None:
                out.append((rundir, started["pid"], started.get("startTicks")))
            elif rundir in self.launching:
                out.append((rundir, self.launching[rundir], None))
        return [r for r in out if self.agent.process_alive(r[1], r[2])]

    def stop_processes(self, grace: int, why: str) -> None:
        """SIGTERM every live process group of this pod, wait up to `grace` s, then SIGKILL."""
        runs = self.live_runs()
        if not runs:
            return
        log.info("pod %s: %s; stopping %d container process(es) (SIGTERM, grace %ds)", self.key, why,
                 len(runs), grace)
        self.agent.event(self.pod, "Killing", f"Stopping containers ({why}), grace period {grace}s")
        for _, pid, _ in runs:
            kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        alive = runs
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [r for r in alive if self.agent.process_alive(r[1], r[2])]
        for rundir, pid, _ in alive:
            log.info("pod %s: pid %d still running after %ds; SIGKILL", self.key, pid, grace)
            kill_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [r for r in alive if self.agent.process_alive(r[1], r[2])]
        for rundir, pid, _ in runs:
            kill_group(pid, signal.SIGKILL)  # leftovers of the group (grandchildren)
            if read_json(rundir / "exit.json") is None and read_json(rundir / "result.json") is None:
                started = read_json(rundir / "started.json") or {}
                write_json(rundir / "exit.json", {"exitCode": 137, "reason": "Error",
                                                  "message": f"killed by the node agent ({why})",
                                                  "finishedAt": now_iso(), "finishedEpoch": time.time(),
                                                  "startedAt": started.get("startedAt")})
            self.launching.pop(rundir, None)

    def finalize_deletion(self) -> bool:
        """The pod is being deleted: stop it, report its final status, then delete it for good."""
        pod = self.pod
        self.deleting = True  # nothing restarts any more
        self.stop_processes(self.grace_seconds(), why="pod is being deleted")
        if self.dir.is_dir() and pod.status is not None and pod.status.phase not in TERMINAL_PHASES:
            view = self.observe()
            # a deleted pod ends in a terminal phase, like with the kubelet
            if view.phase not in TERMINAL_PHASES:
                runs = [r for r in view.main.values() if r is not None]
                ok = (view.init_done and len(runs) == len(view.main)
                      and all(r.status == "terminated" and r.result["exitCode"] == 0 for r in runs))
                view.phase = "Succeeded" if ok else "Failed"
            self.patch_status(self.build_status(view))
        try:
            self.agent.core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=self.uid)))
            log.info("pod %s: deleted (grace 0) after its processes stopped", self.key)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("pod %s: final delete failed: %s %s", self.key, e.status, e.reason)
                self.wake.wait(2)
                return False
        return True


# ----------------------------------------------------------------------------------------------


def parse_taint(text: str) -> dict:
    """KEY[=VALUE]:EFFECT, as in kubectl taint."""
    kv, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not kv:
        raise argparse.ArgumentTypeError(f"bad taint {text!r}: want KEY[=VALUE]:EFFECT")
    key, _, value = kv.partition("=")
    return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="rlops dev-only node agent: registers a GPU-looking node and runs its pods as "
                    "local processes (a stand-in for a kubelet). See docs/node-agent.md.")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or str(
        Path.home() / ".cache/rlops/cluster/kubeconfig"), help="kubeconfig of the cluster (admin)")
    p.add_argument("--node-name", default=socket.gethostname(), help="name of the Node to register")
    p.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu capacity to advertise (default 8)")
    p.add_argument("--max-pods", type=int, default=20, help="pods capacity (default 20)")
    p.add_argument("--state-dir", default=None,
                   help="where per-pod state and logs live (default ~/.cache/rlops/node-agent/<node-name>)")
    p.add_argument("--path-prepend", default=os.path.dirname(sys.executable),
                   help="directory put in front of PATH for containers (default: the directory of "
                        "the Python running the agent, i.e. the venv's bin)")
    p.add_argument("--taint", action="append", metavar="KEY[=VALUE]:EFFECT",
                   help="an extra node taint (repeatable), e.g. to keep other pods off a test node; "
                        f"{GPU_RESOURCE}:NoSchedule is set unless --cpu-pods")
    p.add_argument("--cpu-pods", action="store_true",
                   help=f"take CPU-only pods too: no {GPU_RESOURCE}:NoSchedule taint (a GPU node left "
                        "open to any pod, as in clusters that do not reserve their GPU nodes)")
    p.add_argument("--log-level", default=os.environ.get("RLOPS_NODE_AGENT_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if args.state_dir is None:
        args.state_dir = str(Path.home() / ".cache/rlops/node-agent" / args.node_name)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s node-agent[%(threadName)s] %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    agent = Agent(args)

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
