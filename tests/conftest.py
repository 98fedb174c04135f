"""Shared fixtures: a real local control plane, the dev node agent, and the operator process.

The integration and e2e tiers run against a cluster of their own (``rlops-test``, not the
demo's ``rlops``), brought up by the same script as the demo (``hack/start-local.sh``) and
deleted at the end of the session (``RLOPS_KEEP_TEST_CLUSTER=1`` keeps it). Nothing here mocks
the Kubernetes API: tests talk to the API server with kubectl, as users do. Helpers live in
``tests/support.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest

from support import CACHE, REPO, TEST_CLUSTER, Cluster, NatsServer, OperatorProcess, wait_for  # noqa: F401 (re-exported)


@pytest.fixture(scope="session")
def cluster(request) -> Cluster:
    env = {**os.environ, "RLOPS_CLUSTER_NAME": TEST_CLUSTER, "RLOPS_NO_OPERATOR": "1"}
    if not os.environ.get("RLOPS_KEEP_TEST_CLUSTER"):  # before the bring-up: a half-started one goes too
        request.addfinalizer(lambda: subprocess.run(["bash", str(REPO / "hack" / "cluster-down.sh")], env=env,
                                                    check=False, timeout=120))
    subprocess.run(["bash", str(REPO / "hack" / "start-local.sh")], env=env, check=True, timeout=3000)
    c = Cluster(name=TEST_CLUSTER, dir=CACHE / "clusters" / TEST_CLUSTER, env=env)
    os.environ["RLOPS_KUBECONFIG"] = str(c.kubeconfig)
    return c


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory) -> NatsServer:
    """Debian's nats-server with JetStream, for the trajectory trigger and the events out."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def operator(cluster: Cluster, nats_server: NatsServer, tmp_path_factory) -> OperatorProcess:
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("operator"))
    op.nats_url = nats_server.url
    op.start()
    yield op
    op.kill(signal.SIGTERM)


@pytest.fixture
def namespace(cluster: Cluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
