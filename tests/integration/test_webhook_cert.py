"""The webhook's certificate in a shared Secret, against the real API server: replicas starting
at once agree on one certificate, an expiring one is renewed (compare-and-swap on its
resourceVersion), and with cert-manager the operator only reads (and waits for) the Secret."""

from __future__ import annotations

import base64
import threading
import time

import pytest
from kubernetes import client, config

from rl_operator import certs, kube

NAMES = ["rlops-operator.rlops-system.svc", "rlops-operator.rlops-system.svc.cluster.local"]


@pytest.fixture
def api(cluster, namespace):
    config.load_kube_config(config_file=str(cluster.kubeconfig))
    return client.CoreV1Api()


def ensure(namespace: str, managed: bool = False, wait: float = 30.0) -> dict[str, bytes]:
    return kube.ensure_tls_secret(namespace, "rlops-webhook-tls", lambda d: certs.certs_usable(d, NAMES),
                                  lambda: certs.make_webhook_certs(NAMES), managed=managed, wait_seconds=wait,
                                  poll_seconds=0.5)


def test_replicas_starting_at_once_serve_one_certificate(api, namespace):
    results: list[dict[str, bytes]] = []
    barrier = threading.Barrier(4)

    def replica() -> None:
        barrier.wait()
        results.append(ensure(namespace))

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4
    stored = kube.read_secret_data(namespace, "rlops-webhook-tls")[0]
    assert all(r == stored for r in results), "replicas would serve different CAs"
    assert api.read_namespaced_secret("rlops-webhook-tls", namespace).type == "kubernetes.io/tls"
    assert ensure(namespace) == stored  # a restart reuses it


def test_an_expiring_certificate_is_renewed_and_a_foreign_one_replaced(api, namespace):
    short = certs.make_webhook_certs(NAMES, days=10)  # inside the 30-day renewal window
    api.create_namespaced_secret(namespace, {
        "metadata": {"name": "rlops-webhook-tls"}, "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in short.items()}})
    renewed = ensure(namespace)
    assert renewed != short and certs.certs_usable(renewed, NAMES)
    assert kube.read_secret_data(namespace, "rlops-webhook-tls")[0] == renewed
    # a certificate for other names (say, the Service was renamed) is replaced too
    other = certs.make_webhook_certs(["other.svc"])
    secret = api.read_namespaced_secret("rlops-webhook-tls", namespace)
    secret.data = {k: base64.b64encode(v).decode() for k, v in other.items()}
    api.replace_namespaced_secret("rlops-webhook-tls", namespace, secret)
    assert certs.certs_usable(ensure(namespace), NAMES)


def test_with_cert_manager_the_operator_only_reads_and_waits(api, namespace):
    issued = certs.make_webhook_certs(NAMES)

    def issue_later() -> None:  # what cert-manager does, a moment after the operator starts
        time.sleep(2)
        api.create_namespaced_secret(namespace, {
            "metadata": {"name": "rlops-webhook-tls"}, "type": "kubernetes.io/tls",
            "data": {k: base64.b64encode(v).decode() for k, v in issued.items()}})

    threading.Thread(target=issue_later).start()
    start = time.monotonic()
    assert ensure(namespace, managed=True) == issued
    assert time.monotonic() - start >= 1.5
    # an expiring managed certificate is not touched: the operator waits for cert-manager
    secret = api.read_namespaced_secret("rlops-webhook-tls", namespace)
    secret.data = {k: base64.b64encode(v).decode() for k, v in certs.make_webhook_certs(NAMES, days=5).items()}
    api.replace_namespaced_secret("rlops-webhook-tls", namespace, secret)
    with pytest.raises(TimeoutError, match="cert-manager"):
        ensure(namespace, managed=True, wait=2)
    assert kube.read_secret_data(namespace, "rlops-webhook-tls")[0]["tls.crt"] == \
        base64.b64decode(secret.data["tls.crt"])
