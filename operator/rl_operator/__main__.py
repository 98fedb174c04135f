"""``python -m rl_operator`` / ``rlops-operator``: run the rlops controller."""

from __future__ import annotations

import argparse
import os
import secrets

import kopf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlops-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness probe endpoint (kopf); empty to disable")
    parser.add_argument("--peering", default=os.environ.get("RLOPS_PEERING", ""),
                        help="name of the ClusterKopfPeering through which replicas see each other: only the "
                             "one with the highest (random) priority works, the others stand by (env "
                             "RLOPS_PEERING); empty: standalone, one replica only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.peering and args.namespace:
        parser.error("--peering needs the all-namespaces mode (the peering object is cluster-scoped)")
    # kopf's own log set-up: object lines carry a [namespace/name] prefix.
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN, log_prefix=True)
    import rl_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=not args.peering,
        peering_name=args.peering or None,
        # distinct priorities: kopf pauses every operator that sees a peer of the same priority
        priority=secrets.randbelow(2**31) if args.peering else None,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )


if __name__ == "__main__":
    main()
