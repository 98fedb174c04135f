"""``python -m rl_operator.uninstall [NAME ...]``: remove the webhook configurations the operator manages.

Run by the Helm chart's pre-delete hook. The approval webhook is persistent (it stays
registered, failing closed, while the operator is down), so an uninstall that left it behind
would have the API server refuse every Rollout write. Deletes the mutating and validating
configurations named ``NAME`` (default ``rlops.dev``; with shards, ``<shard>.rlops.dev`` each);
absent ones are fine. Exit status 0 on success.
"""

from __future__ import annotations

import sys

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rl_operator import kube
from rl_operator import models as m


def main(argv: list[str] | None = None) -> int:
    names = [n.strip(",") for n in (sys.argv[1:] if argv is None else argv) if n.strip(",")] or [m.GROUP]
    kube.load_config()
    api = client.AdmissionregistrationV1Api()
    for name in names:
        for delete in (api.delete_mutating_webhook_configuration, api.delete_validating_webhook_configuration):
            try:
                delete(name)
                print(f"deleted {delete.__name__.removeprefix('delete_')} {name}")
            except ApiException as exc:
                if exc.status != 404:
                    print(f"cannot delete the {name} webhook configuration: {exc.status} {exc.reason}", file=sys.stderr)
                    return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
