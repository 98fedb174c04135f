"""``python -m rl_operator.uninstall``: remove the webhook configurations the operator manages.

Run by the Helm chart's pre-delete hook. The approval webhook is persistent (it stays
registered, failing closed, while the operator is down), so an uninstall that left it behind
would have the API server refuse every Rollout write. Deletes the mutating and validating
configurations named ``rlops.dev``; absent ones are fine. Exit status 0 on success.
"""

from __future__ import annotations

import sys

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rl_operator import kube
from rl_operator import models as m


def main() -> int:
    kube.load_config()
    api = client.AdmissionregistrationV1Api()
    for delete in (api.delete_mutating_webhook_configuration, api.delete_validating_webhook_configuration):
        try:
            delete(m.GROUP)
            print(f"deleted {delete.__name__.removeprefix('delete_')} {m.GROUP}")
        except ApiException as exc:
            if exc.status != 404:
                print(f"cannot delete the {m.GROUP} webhook configuration: {exc.status} {exc.reason}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
