#!/usr/bin/env python
"""Run the operator (``python -m rl_operator ...``) and count its API requests by client, verb
and kind: the breakdown behind the scale benchmark's "API requests per agent" (hack/bench/scale.py
``--breakdown``). The total is the API server's own count; this says where it comes from.

Counts both clients: the ``kubernetes`` library's (the operator's reads and writes) and kopf's
(watches, finalizers, its progress annotations, Events). Written as JSON to
``$RLOPS_COUNT_REQUESTS_OUT`` when the process exits (SIGTERM included). Dev tooling only.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import signal
import sys

COUNTS: collections.Counter[str] = collections.Counter()


def _kind(url: str) -> str:
    """``/apis/rlops.dev/v1alpha1/namespaces/ns/rollouts/r-1/status?x`` -> ``rollouts/status``."""
    path = url.split("?", 1)[0]
    path = re.sub(r"^https?://[^/]+", "", path)
    parts = [p for p in path.split("/") if p]
    parts = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else parts
    if len(parts) >= 2 and parts[0] == "namespaces":
        parts = parts[2:] if len(parts) > 2 else ["namespaces"]
    kind = parts[0] if parts else "?"
    sub = parts[2] if len(parts) > 2 else ""
    return kind + (f"/{sub}" if sub else "")


def _install() -> None:
    from kubernetes.client import rest

    original = rest.RESTClientObject.request

    def counted(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        COUNTS[f"kubernetes {method} {_kind(url)}"] += 1
        return original(self, method, url, *args, **kwargs)

    rest.RESTClientObject.request = counted

    from kopf._cogs.clients import api

    kopf_request = api.request

    async def kopf_counted(method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        watch = "watch=true" in url
        COUNTS[f"kopf {method}{' watch' if watch else ''} {_kind(url)}"] += 1
        return await kopf_request(method, url, *args, **kwargs)

    api.request = kopf_counted


def _dump() -> None:
    out = os.environ.get("RLOPS_COUNT_REQUESTS_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(dict(COUNTS.most_common()), f, indent=1)


if __name__ == "__main__":
    _install()
    atexit.register(_dump)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # kopf installs its own; atexit still runs
    from rl_operator.__main__ import main

    main(sys.argv[1:])
