"""Test helpers shared by every tier (import with ``from support import ...``).

Kept out of ``conftest.py`` on purpose: pytest registers each conftest.py under the module name
``conftest``, so importing helpers from "conftest" depends on which one was loaded last.
"""


from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RLOPS_CACHE", Path.home() / ".cache" / "rlops"))
TEST_CLUSTER = os.environ.get("RLOPS_TEST_CLUSTER", "rlops-test")


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Call ``probe`` until it returns something truthy; return that. Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class Cluster:
    name: str
    dir: Path
    env: dict[str, str] = field(repr=False)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the project's kubectl against this cluster; stdout/stderr are captured as text."""
        cmd = [str(CACHE / "bin" / "current" / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def get(self, *args: str) -> dict[str, Any] | None:
        """``kubectl get ... -o json``, or None when the object does not exist."""
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)

    def apply(self, manifest: str, namespace: str) -> subprocess.CompletedProcess:
        return self.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """``python -m rl_operator`` as a local process, authenticated as the rlops-operator ServiceAccount."""

    def __init__(self, cluster: Cluster, workdir: Path):
        self.cluster = cluster
        self.workdir = workdir
        self.artifact_root = f"file://{workdir / 'artifacts'}"
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen | None = None
        # distinct: ports picked one at a time may repeat (each is free once released)
        self.port, self.webhook_port, self.receiver_port, self.metrics_port = free_ports(4)
        # the API server's audit webhook points at a fixed port and CA (hack/cluster-up.sh)
        self.audit_port = int((cluster.dir / "audit-port").read_text()) if (cluster.dir / "audit-port").exists() \
            else None
        self.extra_env: dict[str, str] = {}
        self.nats_url: str | None = None  #: RLOPS_NATS_URL (and the events out on), when set

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The operator's command line and environment (``extra_env`` last: it may override)."""
        kubeconfig = subprocess.run(
            ["bash", str(REPO / "hack" / "operator-kubeconfig.sh")], env=self.cluster.env,
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        env = {**os.environ, "KUBECONFIG": kubeconfig, "RLOPS_ARTIFACT_ROOT": self.artifact_root,
               "RLOPS_RESYNC_SECONDS": "5", "RLOPS_WEBHOOK_PORT": str(self.webhook_port),
               "RLOPS_CERT_DIR": str(self.workdir / "certs"),
               "RLOPS_ALERT_RECEIVER": f"127.0.0.1:{self.receiver_port}",
               "RLOPS_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}"}
        if self.audit_port:
            env.update(RLOPS_AUDIT_RECEIVER=f"127.0.0.1:{self.audit_port}",
                       RLOPS_AUDIT_CERT_DIR=str(self.cluster.dir / "audit-certs"))
        client_ca = self.cluster.dir / "webhook-client" / "ca.crt"
        if client_ca.exists():  # the API server presents its client certificate (hack/cluster-up.sh)
            env["RLOPS_WEBHOOK_CLIENT_CA"] = str(client_ca)
        if self.nats_url:
            env.update(RLOPS_NATS_URL=self.nats_url, RLOPS_NATS_EVENTS="1")
        env.update(self.extra_env)
        return [sys.executable, "-m", "rl_operator", "--liveness", f"http://127.0.0.1:{self.port}/healthz"], env

    def start(self) -> None:
        argv, env = self.command()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._healthy, 60, "operator liveness endpoint")

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """The operator's ``/metrics``, scraped now (see :func:`scrape`)."""
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """A Prometheus text endpoint as ``{(sample name, frozenset of label items): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels``, or None."""
    found = [v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}"
    return found[0] if found else None




class NatsServer:
    """Debian's ``nats-server`` with JetStream, as a local process on a free port (its store in
    ``workdir``), and the few client calls the tests make (nats-py, each in its own event loop)."""

    BINARY = "/usr/sbin/nats-server"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.workdir / "nats-server.log", "a")
        self.proc = subprocess.Popen(
            [self.BINARY, "--jetstream", "--store_dir", str(self.workdir / "jetstream"), "--addr", "127.0.0.1",
             "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._up, 30, "nats-server")

    def _up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """``await fn(js)`` with a fresh connection (``js``: its JetStream context)."""
        import asyncio

        import nats

        async def run() -> Any:
            nc = await nats.connect(self.url)
            try:
                return await fn(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(run())

    def add_stream(self, name: str, subjects: list[str]) -> None:
        async def add(js: Any) -> None:
            await js.add_stream(name=name, subjects=subjects)
        self.call(add)

    def publish(self, subject: str, payloads: list[bytes]) -> list[int]:
        """Publish to JetStream; the stream sequence numbers."""
        async def pub(js: Any) -> list[int]:
            return [(await js.publish(subject, p)).seq for p in payloads]
        return self.call(pub)

    def messages(self, stream: str, subject: str) -> list[tuple[int, dict[str, str], bytes]]:
        """Every message on ``subject`` in ``stream``: (sequence, headers, data), in order (none
        while there is no such stream)."""
        async def get(js: Any) -> list[tuple[int, dict[str, str], bytes]]:
            import nats.js.errors

            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []  # not created yet
            found, seq = [], 1
            while seq <= info.state.last_seq:
                try:
                    msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
                except Exception:  # nats.js.errors.NotFoundError: no more
                    break
                found.append((msg.seq, dict(msg.headers or {}), msg.data))
                seq = msg.seq + 1
            return found
        return self.call(get)


EVENT_STREAMS = {"agent.rl.training.request.v1": "RL_TRAINING", "agent.rl.training.status.v1": "RL_TRAINING",
                 "agent.rl.model.deployed.v1": "RL_DEPLOYMENTS"}


def published_events(nats_server: NatsServer, subject: str, namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """The operator's events out on ``subject`` about ``namespace``: (Nats-Msg-Id, payload), in
    order, each payload checked against its JSON Schema in docs/events/."""
    import jsonschema

    schema = json.loads((REPO / "docs" / "events" / f"{subject}.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    found = []
    for _, headers, data in nats_server.messages(EVENT_STREAMS[subject], subject):
        payload = json.loads(data)
        if payload.get("namespace") != namespace:
            continue
        validator.validate(payload)
        found.append((headers.get("Nats-Msg-Id"), payload))
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound together, so no duplicates)."""
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


OPERATOR_USER = "system:serviceaccount:rlops-system:rlops-operator"


#: An RLAgent whose pods no node takes (a node label nothing carries), with serving off: for the
#: tests of what the operator writes. ``PENDING_AGENT.format(name=..., extra=...)``, where
#: ``extra`` holds more lines under ``spec`` (two spaces in).
PENDING_AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {{name: {name}}}
spec:
  environment: {{id: CartPole-v1}}
  training: {{totalTimesteps: 20480, nodeSelector: {{rlops.dev/test-pool: none}}}}
  serving: {{enabled: false}}
{extra}"""


def stage_chain(cluster: Cluster, namespace: str, agent: str, run: str, artifact_root: str,
                fingerprint: str | Callable[[str], str], mean_return: float = 500.0,
                generation: int = 99, rollout: bool = True) -> dict[str, Any]:
    """A Succeeded TrainingRun without training or evaluation, and the Rollout that the operator makes from it.

    For admission and approval tests that need a Rollout in the operator's owner chain but not a
    real artifact. The run is created *as the operator's ServiceAccount* (impersonated by the
    test's admin) with the operator's controller ownerReference; once the operator has seen it
    (Pending: the agent's pods must be unschedulable), its status is set to Succeeded with the
    artifact URI the operator assigns (``<root>/<namespace>/<agent>/<run>-<uid8>``) and a measured
    evaluation signed with the operator's key (:func:`staged_evaluation`). The operator
    then creates the Rollout itself (on the next event of the run's Job). Returns that Rollout.
    ``fingerprint`` may be a function that writes the artifact at the assigned URI and returns its
    fingerprint (e.g. a deliberately faulty policy for a rollback test). The run's own Job is
    deleted once the status is set, so that no training runs beside the test. The e2e tier trains for real.
    ``generation``: the run's ``spec.trigger.agentGeneration`` (its place among the agent's runs).
    ``rollout=False``: return the run once it holds Succeeded, without waiting for a Rollout.
    """
    owner = cluster.get("rlagent", agent, "-n", namespace)
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": agent,
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    spec = owner["spec"]
    body = {"apiVersion": "rlops.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": run, "labels": {"rlops.dev/agent": agent}, "ownerReferences": [ref]},
            "spec": {"agentRef": {"name": agent}, "trigger": {"reason": "SpecChanged", "agentGeneration": generation},
                     **{k: spec[k] for k in ("environment", "algorithm", "training", "evaluation")}}}
    cluster.kubectl("create", "-n", namespace, "-f", "-", f"--as={OPERATOR_USER}", input=json.dumps(body))
    tr = wait_for(lambda: (r := cluster.get("trainingrun", run, "-n", namespace)) and
                  (r.get("status") or {}).get("phase") in ("Pending", "Running") and r, 60, f"TrainingRun {run} seen")
    uri = f"{artifact_root.rstrip('/')}/{namespace}/{agent}/{run}-{tr['metadata']['uid'][:8]}"
    if callable(fingerprint):
        fingerprint = fingerprint(uri)
    status = {"status": {"phase": "Succeeded", "artifactURI": uri, "fingerprint": fingerprint,
                         "metrics": {"meanReturn": mean_return},
                         "evaluation": staged_evaluation(cluster, namespace, run, tr["metadata"]["uid"], fingerprint,
                                                         mean_return)}}

    def patch() -> None:
        cluster.kubectl("patch", "trainingrun", run, "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps(status))

    patch()
    # the operator re-reads a run on its Job's events: touch the Job so that it sees Succeeded,
    # then delete it, so that no trainer runs beside the test (and writes over the artifact)
    cluster.kubectl("annotate", "job", run, "-n", namespace, "rlops-test/staged=true", "--overwrite", check=False)
    cluster.kubectl("delete", "job", run, "-n", namespace, "--cascade=foreground", "--wait=false", check=False)

    def succeeded() -> dict[str, Any] | None:
        # The test plays the trainer here, racing the operator: a sync that read the run before
        # the patch writes Pending back over it. Patch again until Succeeded holds.
        now = (cluster.get("trainingrun", run, "-n", namespace) or {}).get("status") or {}
        if now.get("phase") != "Succeeded" or (now.get("evaluation") or {}).get("phase") != "Succeeded":
            patch()
            return None
        return cluster.get("rollout", run, "-n", namespace) if rollout else cluster.get("trainingrun", run, "-n", namespace)

    return wait_for(succeeded, 60, f"Rollout {run} from the operator" if rollout else f"TrainingRun {run} Succeeded")


def staged_evaluation(cluster: Cluster, namespace: str, run: str, uid: str, fingerprint: str,
                      mean_return: float) -> dict[str, Any]:
    """A run's measured evaluation as the operator's evaluation Job leaves it, signed with the
    operator's key (read from its Secret as the test's admin): for tests that need a Rollout but
    not its measurement (:func:`stage_chain`). The e2e tier measures trained runs for real."""
    import base64

    from rl_operator import models as m
    from rl_operator import trust

    secret = wait_for(lambda: cluster.get("secret", "rlops-approval-key", "-n", "rlops-system"), 60,
                      "the operator's signing key")
    record = m.MeasuredEvaluation(phase="Succeeded", job_name=f"rlops-eval-{uid}", image="ghcr.io/rlops/engine:0.1.0",
                                  image_id="", trusted=True, seed=1, episodes=20, fingerprint=fingerprint,
                                  mean_return=mean_return, std_return=0.0, random_mean_return=20.0)
    record.signature = trust.evaluation_signature(base64.b64decode(secret["data"]["key"]), namespace, run, uid,
                                                  trust.evidence(record))
    return record.wire()


def count_opens(monkeypatch, swap: dict[str, bytes] | None = None) -> "collections.Counter[str]":
    """Count local-file opens per path; on the first open of a file named in ``swap``, replace
    it atomically on disk with other bytes (a tenant swapping it after it was hashed)."""
    from fsspec.implementations.local import LocalFileSystem

    import collections

    opens: collections.Counter = collections.Counter()
    original = LocalFileSystem._open

    def counting_open(self, path, mode="rb", *args, **kwargs):
        f = original(self, path, mode, *args, **kwargs)
        if "r" in mode:
            name = os.path.basename(path)
            opens[name] += 1
            if swap and name in swap and opens[name] == 1:
                tmp = path + ".swap"
                with open(tmp, "wb") as out:
                    out.write(swap[name])
                os.replace(tmp, path)
        return f

    monkeypatch.setattr(LocalFileSystem, "_open", counting_open)
    return opens


def start_training(workdir: Path, namespace: str, agent: str, run: str, seed: int,
                   total_timesteps: int = 4096) -> subprocess.Popen:
    """``python -m rl_engine.train`` for a short CartPole PPO run, writing ``file://<workdir>/<run>``
    (the trainer as the Job runs it, without the Job). ``finish_training`` waits for it."""
    config = {
        "agent": agent, "namespace": namespace, "run": run,
        "environment": {"id": "CartPole-v1", "numEnvs": 4},
        "algorithm": {"name": "PPO"},
        "training": {"totalTimesteps": total_timesteps, "seed": seed},
        "evaluation": {"episodes": 5},
    }
    path = workdir / f"{run}.json"
    path.write_text(json.dumps(config))
    return subprocess.Popen(
        [sys.executable, "-m", "rl_engine.train", "--config", str(path), "--artifact-uri", f"file://{workdir / run}"],
        env={**os.environ, "RLOPS_TERMINATION_MESSAGE_PATH": str(workdir / f"{run}.term")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def finish_training(workdir: Path, run: str, proc: subprocess.Popen) -> dict[str, str]:
    """Wait for ``start_training``'s run; its ``{"artifactURI", "fingerprint"}``."""
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((workdir / f"{run}.term").read_text())
    return {"artifactURI": summary["artifactURI"], "fingerprint": summary["fingerprint"]}


def prometheus_up(state: Path, scrape_target: str, webhook_url: str, token: str,
                  addr: str = "127.0.0.1", prom_port: int | None = None) -> dict[str, Any]:
    """Prometheus + Alertmanager (``hack/prom-up.sh``) on free ports with their state in ``state``,
    scraping ``scrape_target`` (host:port) and sending alerts to ``webhook_url`` with ``token``;
    Prometheus listens on ``addr`` (at ``prom_port`` if given).
    Returns ``{"prometheus": url, "alertmanager": url, "env": env}``; ``prometheus_down(env)`` stops them."""
    prom, am = free_ports(2)
    prom = prom_port or prom
    (state / "token").write_text(token)
    env = {**os.environ, "RLOPS_STATE_DIR": str(state), "RLOPS_PROMETHEUS_PORT": str(prom),
           "RLOPS_PROMETHEUS_ADDR": addr,
           "RLOPS_ALERTMANAGER_PORT": str(am), "RLOPS_SCRAPE_TARGETS": scrape_target,
           "RLOPS_ALERT_WEBHOOK_URL": webhook_url, "RLOPS_ALERT_TOKEN_FILE": str(state / "token")}
    subprocess.run(["bash", str(REPO / "hack" / "prom-up.sh")], env=env, check=True, timeout=180)
    return {"prometheus": f"http://{addr}:{prom}", "alertmanager": f"http://127.0.0.1:{am}", "env": env}


def prometheus_down(env: dict[str, str]) -> None:
    subprocess.run(["bash", str(REPO / "hack" / "prom-down.sh")], env=env, timeout=120)
