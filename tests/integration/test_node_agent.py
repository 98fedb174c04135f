"""The dev node agent (hack/node_agent.py) against a real API server: no mocks.

It uses the test session's local cluster (the ``cluster`` fixture in ``tests/conftest.py``)
and starts its own agent with its own node name, state dir and an isolating taint, so pods of
other users of that cluster never land on the test node. The node and its Lease are deleted
afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import support
from kubernetes import client, config
from kubernetes.client.rest import ApiException

wait_for = functools.partial(support.wait_for, interval=0.25)  # this file polls faster than the default

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "hack" / "node_agent.py"
GPUS = 4




class AgentProcess:
    """hack/node_agent.py as a subprocess with its own node name and state dir."""

    def __init__(self, kubeconfig: Path, workdir: Path):
        self.kubeconfig = kubeconfig
        self.node = f"test-agent-{uuid.uuid4().hex[:8]}"
        self.isolation_taint = "rlops.dev/node-agent-test"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(AGENT), "--kubeconfig", str(self.kubeconfig), "--node-name", self.node,
                 "--gpus", str(GPUS), "--state-dir", str(self.state_dir),
                 "--taint", f"{self.isolation_taint}={self.node}:NoSchedule", "--log-level", "DEBUG"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def tolerations(self) -> list[dict]:
        return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": self.isolation_taint, "operator": "Equal", "value": self.node, "effect": "NoSchedule"}]

    def sweep_processes(self) -> None:
        """Safety net: kill any container process a failed test left behind."""
        for started in self.state_dir.glob("pods/*/containers/*/*/started.json"):
            try:
                pid = json.loads(started.read_text())["pid"]
                os.killpg(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


@pytest.fixture(scope="module")
def kubeconfig(cluster) -> Path:
    return cluster.kubeconfig


@pytest.fixture(scope="module")
def api(kubeconfig: Path) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    with client.ApiClient(cfg) as api_client:
        yield api_client


@pytest.fixture(scope="module")
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def agent(kubeconfig: Path, core: client.CoreV1Api, api, tmp_path_factory) -> AgentProcess:
    a = AgentProcess(kubeconfig, tmp_path_factory.mktemp("node-agent"))
    a.start()
    try:
        wait_for(lambda: node_ready(core, a.node) or (not a.alive() and pytest.fail(a.log())),
                 30, f"node {a.node} Ready")
        yield a
    finally:
        if a.alive():  # let it finalize whatever is left on its node
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={a.node}").items:
                time.sleep(0.5)
        a.signal(signal.SIGTERM)
        a.sweep_processes()
        for delete in (lambda: core.delete_node(a.node),
                       lambda: client.CoordinationV1Api(api).delete_namespaced_lease(a.node, "kube-node-lease")):
            try:
                delete()
            except ApiException as e:
                if e.status != 404:
                    raise


@pytest.fixture(scope="module")
def namespace(core: client.CoreV1Api, agent: AgentProcess) -> str:
    name = f"node-agent-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})

    def has_default_sa():
        try:
            return core.read_namespaced_service_account("default", name)
        except ApiException:
            return None

    if not wait_for(has_default_sa, 15, "default service account", interval=0.5):
        core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    yield name
    core.delete_namespace(name)
    wait_for(lambda: not core.list_namespaced_pod(name).items, 30, f"pods of {name} deleted")


def node_ready(core: client.CoreV1Api, name: str):
    try:
        node = core.read_node(name)
    except ApiException:
        return None
    ready = [c for c in node.status.conditions or [] if c.type == "Ready" and c.status == "True"]
    return node if ready else None


def pod_manifest(agent: AgentProcess, name: str, command: list[str], **container: Any) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeName": agent.node, "restartPolicy": "Never", "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5, "tolerations": agent.tolerations(),
            "containers": [{"name": "main", "image": "not-used-by-the-node-agent", "command": command,
                            **container}],
        },
    }


def wait_phase(core, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 30):
    def probe():
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in phases else None

    return wait_for(probe, timeout, f"pod {namespace}/{name} in {phases}")


def test_node_is_ready_gpu_node(core, api, agent):
    node = core.read_node(agent.node)
    assert node.status.allocatable["nvidia.com/gpu"] == str(GPUS)
    assert node.status.capacity["nvidia.com/gpu"] == str(GPUS)
    assert node.status.allocatable["pods"] == "20"
    assert node.metadata.labels["rlops.dev/node-agent"] == "true"
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
    assert node.metadata.labels["kubernetes.io/hostname"] == agent.node
    assert {"key": "nvidia.com/gpu", "effect": "NoSchedule"} in [
        {"key": t.key, "effect": t.effect} for t in node.spec.taints if t.value is None]
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "KubeletReady")
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == ["127.0.0.1"]
    lease = client.CoordinationV1Api(api).read_namespaced_lease(agent.node, "kube-node-lease")
    assert lease.spec.holder_identity == agent.node  # also what keeps kwok-controller off this node


def test_pod_succeeds_with_termination_message(core, agent, namespace):
    script = ("import json, os\n"
              "print('hello from', os.environ['POD_NAME'])\n"
              "with open(os.environ['RLOPS_TERMINATION_MESSAGE_PATH'], 'w') as f:\n"
              "    json.dump({'pod': os.environ['POD_NAME'], 'node': os.environ['NODE'], 'ok': True}, f)\n")
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    core.create_namespaced_pod(namespace, pod_manifest(agent, "ok", ["python", "-c", script], env=env))
    pod = wait_phase(core, namespace, "ok", ("Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded", agent.log()[-3000:]
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (0, "Completed")
    assert json.loads(term.message) == {"pod": "ok", "node": agent.node, "ok": True}
    assert term.started_at is not None and term.finished_at is not None
    assert pod.status.pod_ip == "127.0.0.1" and pod.status.host_ip == "127.0.0.1"
    log_path = Path(pod.metadata.annotations["rlops.dev/node-agent-log.main"])
    assert log_path.read_text() == "hello from ok\n"


def test_failing_pod_reports_exit_code_and_log_tail(core, agent, namespace):
    script = "import sys\nfor i in range(100):\n    print('line', i)\nsys.exit(3)\n"
    core.create_namespaced_pod(namespace, pod_manifest(
        agent, "fails", ["python", "-c", script], terminationMessagePolicy="FallbackToLogsOnError"))
    pod = wait_phase(core, namespace, "fails", ("Succeeded", "Failed"))
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (3, "Error")
    lines = term.message.splitlines()
    assert len(lines) == 80 and lines[0] == "line 20" and lines[-1] == "line 99", term.message


def test_job_is_scheduled_to_the_agent_node_and_completes(core, api, agent, namespace):
    batch = client.BatchV1Api(api)
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 5,
                # the real scheduler picks the node: the agent's label (+ ours, to stay off other
                # agents' nodes of a shared cluster), the GPU request and the tolerations
                "nodeSelector": {"rlops.dev/node-agent": "true", "kubernetes.io/hostname": agent.node},
                "tolerations": agent.tolerations(),
                "containers": [{"name": "trainer", "image": "not-used", "command": ["python", "-c", "print('trained')"],
                                "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            }},
        },
    }
    batch.create_namespaced_job(namespace, job)

    def complete():
        j = batch.read_namespaced_job("train", namespace)
        conds = {c.type: c.status for c in j.status.conditions or []}
        assert conds.get("Failed") != "True", (j.status, agent.log()[-3000:])
        return conds.get("Complete") == "True"

    wait_for(complete, 45, "job train Complete")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=train").items
    assert [p.spec.node_name for p in pods] == [agent.node]
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 0


def test_agent_restart_adopts_running_pod_without_running_it_twice(core, agent, namespace, tmp_path):
    runs = tmp_path / "runs.txt"
    script = f"import time\nopen({str(runs)!r}, 'a').write('run\\n')\ntime.sleep(5)\n"
    core.create_namespaced_pod(namespace, pod_manifest(agent, "survivor", ["python", "-c", script]))
    wait_phase(core, namespace, "survivor", ("Running",))
    wait_for(runs.exists, 10, "the container to start")
    agent.signal(signal.SIGKILL)
    time.sleep(1)
    agent.start()
    pod = wait_phase(core, namespace, "survivor", ("Succeeded", "Failed"), timeout=30)
    assert pod.status.phase == "Succeeded", agent.log()[-3000:]
    status = pod.status.container_statuses[0]
    assert status.restart_count == 0 and status.state.terminated.exit_code == 0
    assert runs.read_text() == "run\n"
    wait_for(lambda: node_ready(core, agent.node), 15, "node Ready after the restart")


def test_deleting_a_running_pod_kills_its_process(core, agent, namespace, tmp_path):
    pidfile = tmp_path / "pid"
    script = f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    core.create_namespaced_pod(namespace, pod_manifest(agent, "victim", ["python", "-c", script]))
    wait_phase(core, namespace, "victim", ("Running",))
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10, "the container's pid"))
    assert process_running(pid)
    core.delete_namespaced_pod("victim", namespace)  # a normal, graceful delete

    def gone():
        try:
            core.read_namespaced_pod("victim", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, 20, "pod victim to be deleted by the agent")
    assert not process_running(pid), f"process {pid} survived its pod"


def process_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_pod_active_deadline_fails_the_pod(core, agent, namespace):
    manifest = pod_manifest(agent, "overdue", ["python", "-c", "import time; time.sleep(120)"])
    manifest["spec"]["activeDeadlineSeconds"] = 2
    core.create_namespaced_pod(namespace, manifest)
    pod = wait_phase(core, namespace, "overdue", ("Succeeded", "Failed"), timeout=20)
    assert (pod.status.phase, pod.status.reason) == ("Failed", "DeadlineExceeded")
    term = pod.status.container_statuses[0].state.terminated
    assert term is not None and term.exit_code == 143  # SIGTERM, like a container runtime reports it
