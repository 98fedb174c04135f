"""``python -m rl_operator`` / ``rlops-operator``: run the rlops controller."""

from __future__ import annotations

import argparse
import os
import secrets
import sys

import kopf

#: Characters of a namespace pattern (kopf accepts globs; a webhook's namespaceSelector does not).
_GLOB = set("*?[]!,")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlops-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append",
                        default=[n for n in os.environ.get("RLOPS_NAMESPACES", "").split(",") if n],
                        help="serve only this namespace (repeatable; env RLOPS_NAMESPACES, comma separated); "
                             "default: all namespaces")
    parser.add_argument("--shard", default=os.environ.get("RLOPS_SHARD", ""),
                        help="this operator's shard name, when several operators split the namespaces (each "
                             "with its own --namespace list and its own Ray cluster; env RLOPS_SHARD)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness probe endpoint (kopf); empty to disable")
    parser.add_argument("--peering", default=os.environ.get("RLOPS_PEERING", ""),
                        help="name of the ClusterKopfPeering through which replicas see each other: only the "
                             "one with the highest (random) priority works, the others stand by (env "
                             "RLOPS_PEERING); empty: standalone, one replica only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    namespaces = sorted(set(args.namespace))
    if args.peering and namespaces:
        parser.error("--peering needs the all-namespaces mode (the peering object is cluster-scoped)")
    if args.shard and not namespaces:
        parser.error("--shard needs --namespace: a shard serves the namespaces it lists")
    if any(_GLOB & set(n) for n in namespaces):
        parser.error(f"--namespace {', '.join(namespaces)}: name each namespace (no patterns): the approval "
                     "webhook selects namespaces by name")
    # one source for the rest of the operator (handlers read OperatorSettings from the environment)
    os.environ["RLOPS_NAMESPACES"] = ",".join(namespaces)
    os.environ["RLOPS_SHARD"] = args.shard
    # kopf's own log set-up: object lines carry a [namespace/name] prefix.
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN, log_prefix=True)
    import rl_operator.handlers as handlers
    from rl_operator import kube, peering, shards

    kube.load_config()
    error = shards.claim_ray_cluster(handlers.RUNTIME.settings)
    if error:
        print(f"rlops-operator: {error}", file=sys.stderr)
        sys.exit(2)

    peering.IDENTITY = peering.own_identity()
    kopf.run(
        standalone=not args.peering,
        identity=peering.IDENTITY,
        peering_name=args.peering or None,
        # distinct priorities: kopf pauses every operator that sees a peer of the same priority
        priority=secrets.randbelow(2**31) if args.peering else None,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )


if __name__ == "__main__":
    main()
