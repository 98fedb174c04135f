"""Helpers of the cluster tier (fixtures are in conftest.py)."""

from __future__ import annotations

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
    """A tenant namespace with the chart's artifact claim (``rlops-artifacts``), bound to a
    hostPath PersistentVolume of its own at the artifact root's host directory."""
    c.kubectl("create", "namespace", name)
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
  hostPath: {{path: {ARTIFACTS_HOST_DIR}, type: Directory}}
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
