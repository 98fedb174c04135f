#!/usr/bin/env python
"""The scale benchmark's baseline: the least a controller must do per agent, on the same machine.

``hack/bench/scale.py --baseline`` runs this in the operator's place, with the same
ServiceAccount, FlowSchema, kubernetes client and 8 worker threads. Per agent it makes the same
two objects the operator makes, with the operator's own pure functions
(``training.desired_training_run``, ``training.desired_job``), and writes one status:

* an RLAgent appears (watch) -> create its TrainingRun, then the run's Job;
* a Job completes (watch) -> patch its run's status to ``Succeeded``.

No kopf, no caches, no Events, no agent status, no Rollouts, no webhook: whatever latency this
shows on a size is the floor that the machine and the control plane set for the operator's
"apply -> Job" and "Job complete -> run Succeeded" at that size.

Usage: ``minimal_controller.py --liveness http://127.0.0.1:PORT/healthz`` (the health endpoint
the benchmark waits for); KUBECONFIG is the operator's.
"""

from __future__ import annotations

import argparse
import http.server
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client, config, watch

from rl_operator import models as m
from rl_operator import training
from rl_operator.settings import OperatorSettings


def _stream(list_fn, handle, **kw: Any) -> None:
    while True:
        try:
            for ev in watch.Watch().stream(list_fn, timeout_seconds=300, **kw):
                handle(ev["type"], ev["object"])
        except Exception as exc:  # noqa: BLE001 - a dropped watch is restarted
            print(f"watch restarted: {exc!r}"[:200], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--liveness", required=True)
    args = ap.parse_args()
    config.load_kube_config()
    settings = OperatorSettings.from_env()
    custom, batch = client.CustomObjectsApi(), client.BatchV1Api()
    pool = ThreadPoolExecutor(8)
    done: set[tuple[str, str]] = set()

    def start(agent: dict[str, Any]) -> None:
        run = training.desired_training_run(agent, [])
        if run is None:
            return
        run = custom.create_namespaced_custom_object(m.GROUP, m.VERSION, agent["metadata"]["namespace"],
                                                     m.TrainingRun.PLURAL, run)
        batch.create_namespaced_job(run["metadata"]["namespace"], training.desired_job(run, settings))

    def finish(namespace: str, name: str) -> None:
        custom.patch_namespaced_custom_object_status(m.GROUP, m.VERSION, namespace, m.TrainingRun.PLURAL, name,
                                                     {"status": {"phase": "Succeeded"}})

    def on_agent(kind: str, agent: dict[str, Any]) -> None:
        if kind == "ADDED":
            pool.submit(start, agent)

    def on_job(kind: str, job: Any) -> None:
        key = (job.metadata.namespace, job.metadata.name)
        complete = any(c.type == "Complete" and c.status == "True" for c in (job.status.conditions or []))
        if complete and key not in done:
            done.add(key)
            pool.submit(finish, *key)

    threading.Thread(target=_stream, args=(custom.list_cluster_custom_object, on_agent), daemon=True,
                     kwargs={"group": m.GROUP, "version": m.VERSION, "plural": m.RLAgent.PLURAL}).start()
    threading.Thread(target=_stream, args=(batch.list_job_for_all_namespaces, on_job), daemon=True,
                     kwargs={"label_selector": m.RUN_LABEL}).start()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    url = urllib.parse.urlsplit(args.liveness)
    http.server.ThreadingHTTPServer((url.hostname or "127.0.0.1", url.port or 8080), Health).serve_forever()


if __name__ == "__main__":
    main()
