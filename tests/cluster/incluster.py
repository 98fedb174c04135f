"""Helpers of the cluster tier (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import CACHE, Cluster, wait_for

ARTIFACTS_HOST_DIR = Path("/var/lib/rlops/artifacts")  # the hostPath of the PVs and of the Ray head
HELM = CACHE / "bin" / "current" / "helm"


def helm(c: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(HELM), "--kubeconfig", str(c.kubeconfig), *args], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr}")
    return proc


def tenant_namespace(c: Cluster, name: str) -> str:
    """A tenant namespace as docs/install.md sets one up: Pod Security ``restricted`` enforced
    (no hostPath volumes, non-root), and the chart's artifact claim (``rlops-artifacts``) bound to
    a hostPath PersistentVolume of its own at the namespace's directory under the artifact root
    (owned by the trainer's uid 1000), never the whole root."""
    c.kubectl("create", "namespace", name)
    c.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    host_dir = ARTIFACTS_HOST_DIR / name
    host_dir.mkdir(parents=True, exist_ok=True)
    os.chown(host_dir, 1000, 1000)
    c.kubectl("apply", "-f", "-", input=f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: rlops-artifacts-{name}}}
spec:
  capacity: {{storage: 10Gi}}
  accessModes: [ReadWriteMany]
  storageClassName: rlops-hostpath
  persistentVolumeReclaimPolicy: Retain
  claimRef: {{namespace: {name}, name: rlops-artifacts}}
  hostPath: {{path: {host_dir}, type: Directory}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: rlops-artifacts, namespace: {name}}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: rlops-hostpath
  resources: {{requests: {{storage: 10Gi}}}}
  volumeName: rlops-artifacts-{name}
""")
    wait_for(lambda: (c.get("pvc", "rlops-artifacts", "-n", name) or {}).get("status", {}).get("phase") == "Bound",
             60, "artifact claim bound")
    return name


CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "containerd",
                 "kubelet", "kube-proxy")


def cluster_state(c: Cluster) -> str:
    """What a failed test in this tier needs to be explained from CI's output alone: which
    control-plane and node processes are alive, the nodes and pods, the latest events, and the
    tails of the controller manager's, the scheduler's, the kubelet's and the operator's logs."""
    out: list[str] = []

    def section(title: str, text: str) -> None:
        out.append(f"--- {title}\n{text.rstrip()}")

    running = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            running.add(Path(cmdline.read_bytes().split(b"\0", 1)[0].decode(errors="replace")).name)
        except OSError:
            continue
    alive = {name: name in running for name in CONTROL_PLANE}
    section("processes alive", " ".join(f"{n}={'yes' if up else 'NO'}" for n, up in alive.items()))
    for args in (("get", "nodes", "-o", "wide"), ("get", "pods", "-A", "-o", "wide"),
                 ("get", "jobs,pvc,trainingruns,rollouts", "-A")):
        proc = c.kubectl(*args, check=False)
        section("kubectl " + " ".join(args), proc.stdout + proc.stderr)
    events = c.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)
    section("latest events", "\n".join((events.stdout + events.stderr).splitlines()[-40:]))
    logs = CACHE / "kwok" / "clusters" / c.name / "logs"
    for path in (logs / "kube-controller-manager.log", logs / "kube-scheduler.log", c.dir / "node" / "kubelet.log"):
        if path.exists():
            section(f"tail {path}", "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
    operator = c.kubectl("logs", "-n", "rlops-system", "-l", "app.kubernetes.io/name=rlops-operator", "--tail=30",
                         "--all-containers", "--prefix", check=False)
    section("operator logs", operator.stdout + operator.stderr)
    return "\n".join(out)
