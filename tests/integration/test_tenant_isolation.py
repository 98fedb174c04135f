"""A hostile tenant against the operator's memory and its reserved labels, on the real API server.

``mallory`` holds ``edit`` in her namespace. She may create Jobs, pods and RLAgents of any size
the API server takes. What the operator watches and caches stays bounded whatever she writes:

- the labels the operator acts on are reserved on Jobs and pods (ValidatingAdmissionPolicies
  ``rlops.dev-reserved-job-labels`` / ``-pod-labels``), and the operator's watches of Jobs and
  pods are filtered by the API server on the run label, so her Jobs never reach its memory;
- an RLAgent's free-form ``kwargs`` and ``hyperparameters`` hold scalars, short lists and small
  maps only (``rlops.dev-bounded-arguments``), so the largest agent she can write is a few
  megabytes of strings, not a tree of a million small objects.

The operator's peak RSS under both attacks is measured from ``/proc`` and compared with the
chart's memory limit.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from support import OPERATOR_USER, PENDING_AGENT, REPO, wait_for

MALLORY = "mallory"
ATTACKERS = 20


@pytest.fixture
def tenant(cluster, operator, namespace):
    cluster.kubectl("create", "rolebinding", "mallory-edit", "-n", namespace, "--clusterrole=edit", f"--user={MALLORY}")
    return namespace


def as_mallory(cluster, *args, input=None):
    return cluster.kubectl(*args, f"--as={MALLORY}", check=False, input=input)


def refused(proc, *words):
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    for word in words:
        assert word in proc.stderr, proc.stderr


#: Empty environment entries per flooding Job: about 0.4 MB of JSON, and over 1 MB as the API
#: server stores it with its managed fields (with 40,000, this API server refuses the create).
FLOOD_ENTRIES = 20_000


def big_job(name: str, entries: int = FLOOD_ENTRIES, labels: dict[str, str] | None = None,
            template_labels: dict[str, str] | None = None) -> str:
    """A suspended Job with ``entries`` empty environment variables (each a small object once
    decoded: the shape that costs a Python process most per byte)."""
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"suspend": True, "template": {
            "metadata": {"labels": template_labels or {}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "c", "image": "busybox", "env": [{"name": f"E{i}"} for i in range(entries)]}]}}},
    })


def test_the_operators_labels_are_reserved_on_jobs_and_pods(cluster, tenant):
    run_label = {"rlops.dev/training-run": "victim-1"}
    refused(as_mallory(cluster, "create", "-n", tenant, "-f", "-", input=big_job("lab", 1, labels=run_label)),
            "rlops.dev-reserved-job-labels", "set by the rlops operator only", MALLORY)
    # in the pod template only: the Job controller would copy it onto the pods
    refused(as_mallory(cluster, "create", "-n", tenant, "-f", "-", input=big_job("tpl", 1, template_labels=run_label)),
            "rlops.dev-reserved-job-labels")
    refused(as_mallory(cluster, "create", "-n", tenant, "-f", "-",
                       input=big_job("agent", 1, labels={"rlops.dev/agent": "victim"})), "rlops.dev-reserved-job-labels")
    # the operator's own Job and the pod the Job controller makes for it pass
    assert cluster.apply(PENDING_AGENT.format(name="gate", extra=""), tenant).returncode == 0
    job = wait_for(lambda: cluster.get("job", "gate-1", "-n", tenant), 60, "the operator's Job")
    assert job["metadata"]["labels"]["rlops.dev/training-run"] == "gate-1"
    pod = wait_for(lambda: next(iter(cluster.get("pods", "-n", tenant, "-l", "rlops.dev/training-run=gate-1")["items"]),
                                None), 60, "the Job controller's pod")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    # neither can be relabelled by the tenant; other labels stay hers to set
    for kind, name in (("job", "gate-1"), ("pod", pod["metadata"]["name"])):
        refused(as_mallory(cluster, "label", kind, name, "-n", tenant, "--overwrite", "rlops.dev/training-run=other"),
                "reserved")
        refused(as_mallory(cluster, "label", kind, name, "-n", tenant, "rlops.dev/training-run-"), "reserved")
        assert as_mallory(cluster, "label", kind, name, "-n", tenant, "team=ml").returncode == 0
    # a Job that a cluster-admin (not the operator) labels is refused too: the operator's alone
    refused(cluster.kubectl("create", "-n", tenant, "-f", "-", input=big_job("admin", 1, labels=run_label),
                            check=False), "rlops.dev-reserved-job-labels")
    ok = cluster.kubectl("create", "-n", tenant, "-f", "-", f"--as={OPERATOR_USER}", check=False,
                         input=big_job("as-operator", 1, labels=run_label))
    assert ok.returncode == 0, ok.stderr


VALUE_RULE = "each value must be a number"


@pytest.mark.parametrize(("field", "value", "refusal"), [
    ("environment", {"kwargs": {"map_name": "4x4", "desc": ["SFFF", "FHFH", "FFFH", "HFFG"], "is_slippery": False,
                                "reward_scale": 0.5, "render_mode": None}}, None),
    ("algorithm", {"hyperparameters": {"hiddenSizes": [64, 64], "hicra": {"enabled": True, "multiplier": 2.0}}}, None),
    ("environment", {"kwargs": {"deep": {"deeper": {"deepest": 1}}}}, VALUE_RULE),
    ("environment", {"kwargs": {"many": list(range(257))}}, VALUE_RULE),
    ("environment", {"kwargs": {"nested": [[1, 2], [3, 4]]}}, VALUE_RULE),
    ("environment", {"kwargs": {"long": "x" * 4097}}, VALUE_RULE),
    ("environment", {"kwargs": {f"k{i}": i for i in range(33)}}, "must have at most 32"),
    ("algorithm", {"hyperparameters": {"hicra": {f"k{i}": i for i in range(33)}}}, VALUE_RULE),
], ids=["gymnasium-kwargs", "hyperparameters", "map-of-maps", "long-list", "list-of-lists", "long-string",
        "33-names", "big-map"])
def test_free_form_arguments_stay_small(cluster, tenant, field, value, refusal):
    spec = {"environment": {"id": "FrozenLake-v1"}, "training": {"nodeSelector": {"rlops.dev/test-pool": "none"}},
            "serving": {"enabled": False}}
    spec[field] = {**spec.get(field, {}), **value}
    manifest = json.dumps({"apiVersion": "rlops.dev/v1alpha1", "kind": "RLAgent", "metadata": {"name": "args"},
                           "spec": spec})
    proc = as_mallory(cluster, "apply", "-n", tenant, "-f", "-", input=manifest)
    if refusal is None:
        assert proc.returncode == 0, proc.stderr
    else:
        refused(proc, f"spec.{field}", refusal)


class RssSampler:
    """The peak resident set size of a process, sampled from ``/proc/<pid>/status`` every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def __enter__(self) -> "RssSampler":
        self.before = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def chart_memory_limit() -> int:
    limit = yaml.safe_load((REPO / "charts" / "rlops" / "values.yaml").read_text())["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 1024 * 1024


def max_agent(name: str, strings: int = 120) -> str:
    """The largest agent that the admission rules let a tenant write, near the API server's
    object limit: 32 keyword arguments, each a list of ``strings`` strings of 256 characters
    (about 1 MB). Its pods never schedule."""
    kwargs = {f"k{i:02d}": [f"{i:02d}{j:04d}".ljust(256, "x") for j in range(strings)] for i in range(32)}
    return json.dumps({"apiVersion": "rlops.dev/v1alpha1", "kind": "RLAgent", "metadata": {"name": name},
                       "spec": {"environment": {"id": "CartPole-v1", "kwargs": kwargs},
                                "training": {"nodeSelector": {"rlops.dev/test-pool": "none"}},
                                "serving": {"enabled": False}}})


def test_a_flood_of_large_jobs_and_agents_leaves_the_operator_under_its_memory_limit(cluster, operator, tenant):
    """The reproduced attack: 20 suspended Jobs of about 2 MB each (60,000 empty environment
    entries) took an operator from 123 MB to 745 MB when they carried the run label. With the
    label they are now refused; without it they never reach the operator (its watches are
    filtered by the API server). Here each has :data:`FLOOD_ENTRIES` entries. Then 20 agents of the largest size the admission rules allow,
    each copied by the operator into a TrainingRun and a Job (and by the Job controller into a
    pod), all cached. The operator's peak RSS stays under the chart's limit."""
    limit = chart_memory_limit()
    with RssSampler(operator.proc.pid) as rss:
        for i in range(ATTACKERS):
            refused(as_mallory(cluster, "create", "-n", tenant, "-f", "-",
                               input=big_job(f"flood-{i}", labels={"rlops.dev/training-run": f"flood-{i}"})),
                    "rlops.dev-reserved-job-labels")
            proc = as_mallory(cluster, "create", "-n", tenant, "-f", "-", input=big_job(f"flood-{i}"))
            assert proc.returncode == 0, proc.stderr
        after_jobs = rss.rss()
        for i in range(ATTACKERS):
            proc = as_mallory(cluster, "create", "-n", tenant, "-f", "-", input=max_agent(f"big-{i}"))
            assert proc.returncode == 0, proc.stderr[-500:]
        # the operator has made every run and its Job (all cached), and the Job controller the pods
        wait_for(lambda: len(cluster.get("jobs", "-n", tenant, "-l", "rlops.dev/training-run")["items"]) == ATTACKERS,
                 300, "a Job for every large agent", interval=2)
        wait_for(lambda: len(cluster.get("pods", "-n", tenant, "-l", "rlops.dev/training-run")["items"]) == ATTACKERS,
                 300, "a pod for every large agent's Job", interval=2)
        time.sleep(10)  # two resyncs of every unfinished run over the cache
        cluster.kubectl("delete", "rlagents,jobs", "--all", "-n", tenant, "--wait=true", "--timeout=300s")
        time.sleep(5)
    assert operator.proc.poll() is None, "the operator died"
    mib = 1024 * 1024
    print(f"\noperator RSS: {rss.before / mib:.0f} MiB before, {after_jobs / mib:.0f} MiB after {ATTACKERS} Jobs of "
          f"{FLOOD_ENTRIES} entries, peak {rss.peak / mib:.0f} MiB with {ATTACKERS} agents of 1 MB "
          f"(limit {limit / mib:.0f} MiB)")
    assert after_jobs - rss.before < 32 * mib, "the tenant's unlabelled Jobs reached the operator's memory"
    assert rss.peak < limit


@pytest.mark.parametrize(("image", "allowed"), [
    ("ghcr.io/rlops/engine:0.1.0", True),
    ("ghcr.io/rlops/engine@sha256:" + "a" * 64, True),
    ("ghcr.io/rlops/engine-evil:0.1.0", False),
    ("docker.io/mallory/trainer:latest", False),
    ("ghcr.io/rlops/engine", True),
], ids=["tag", "digest", "lookalike", "other", "bare"])
def test_only_the_platforms_trainer_images_are_accepted(cluster, tenant, image, allowed):
    """The trainer decides what it writes into the artifact and reports: an agent names only an
    image the platform allows (the chart's ``training.allowedImages``, by default its own engine
    image), checked by the API server with the field named."""
    manifest = PENDING_AGENT.format(name="img", extra="").replace(
        "training: {totalTimesteps: 20480,", f"training: {{image: '{image}', totalTimesteps: 20480,")
    proc = as_mallory(cluster, "apply", "-n", tenant, "-f", "-", input=manifest)
    if allowed:
        assert proc.returncode == 0, proc.stderr
    else:
        refused(proc, "spec.training.image", image, "not an allowed trainer image", "ghcr.io/rlops/engine")
