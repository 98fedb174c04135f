"""``python -m rl_operator.uninstall [NAME ...]``: remove the webhook configurations the operator manages.

Run by the Helm chart's pre-delete hook. The approval webhook is persistent (it stays
registered, failing closed, while the operator is down), so an uninstall that left it behind
would have the API server refuse every Rollout write. Deletes the mutating and validating
configurations named ``NAME`` (default ``rlops.dev``; with shards, ``<shard>.rlops.dev`` each);
absent ones are fine. Exit status 0 on success.
"""

from __future__ import annotations

import sys

from kubernetes.client.exceptions import ApiException

from rl_operator import kube
from rl_operator import models as m


def main(argv: list[str] | None = None) -> int:
    names = [n.strip(",") for n in (sys.argv[1:] if argv is None else argv) if n.strip(",")] or [m.GROUP]
    kube.load_config()
    for name in names:
        for validating in (False, True):
            kind = "validating" if validating else "mutating"
            try:
                if kube.delete_webhook_configuration(name, validating):
                    print(f"deleted {kind}_webhook_configuration {name}")
            except ApiException as exc:
                print(f"cannot delete the {name} {kind} webhook configuration: {exc.status} {exc.reason}",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
