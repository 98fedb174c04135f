"""Several operators, one cluster: which namespaces this operator serves, and its claim on its
Ray cluster.

A shard is an operator that serves a list of namespaces (``OperatorSettings.namespaces``) under
a name (``OperatorSettings.shard``). Shards never share a Ray cluster: Serve's REST API
replaces the whole config with no compare-and-swap, so two writers would undo each other's
changes. Each operator claims its Ray cluster through a Lease (``rlops-ray-<hash of the URL>``
in the operator's namespace, holder: the shard's name, or ``rlops`` for the one operator of
every namespace) and renews it while it runs; a claim not renewed for
:data:`CLAIM_SECONDS` may be taken over by another shard.
"""

from __future__ import annotations

import hashlib

from rl_operator import kube
from rl_operator.settings import OperatorSettings

#: Seconds a claim counts without renewal (the holder renews every third of it).
CLAIM_SECONDS = 60
#: The holder name of the one operator that serves every namespace.
UNSHARDED = "rlops"


def serves(settings: OperatorSettings, namespace: str) -> bool:
    """Whether ``namespace`` is this operator's: every namespace, unless it serves a list."""
    return not settings.namespaces or namespace in settings.namespaces


def ray_claim_name(dashboard_url: str) -> str:
    """The Lease through which one operator claims the Ray cluster at ``dashboard_url``."""
    return "rlops-ray-" + hashlib.sha256(dashboard_url.rstrip("/").encode()).hexdigest()[:12]


def claim_ray_cluster(settings: OperatorSettings) -> str | None:
    """Claim (or renew the claim on) the Ray cluster at ``settings.ray_dashboard_url``.

    Returns:
        None when the claim is this operator's, else a message naming the shard that holds it.
    """
    holder = settings.shard or UNSHARDED
    name = ray_claim_name(settings.ray_dashboard_url)
    on_record = kube.claim(settings.operator_namespace, name, holder,
                           {"rlops.dev/ray-dashboard-url": settings.ray_dashboard_url}, CLAIM_SECONDS)
    if on_record == holder:
        return None
    return (f"the Ray cluster at {settings.ray_dashboard_url} is served by the operator of shard "
            f"{on_record!r} (Lease {settings.operator_namespace}/{name}); give shard {holder!r} a Ray cluster "
            f"of its own (RLOPS_RAY_DASHBOARD_URL), or stop shard {on_record!r}: its claim lapses "
            f"{CLAIM_SECONDS} s after it stops")
