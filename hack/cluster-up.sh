#!/usr/bin/env bash
# Start the local control plane: etcd, kube-apiserver (RBAC on), kube-controller-manager,
# kube-scheduler and kwok-controller as local processes (kwokctl --runtime binary), from the
# binaries hack/build-binaries.sh built from source. Then add two kwok GPU nodes.
# kwok-controller manages only nodes annotated kwok.x-k8s.io/node=fake (kwokctl's default is
# all nodes, which would fake the pods of the dev node agent's node too).
# Idempotent: a running cluster is left as it is.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$root/hack/build-binaries.sh" >/dev/null
kwokctl() { "$bindir/kwokctl" --name "$cluster_name" "$@"; }

# The API server's audit webhook, pointed at the operator's receiver (POST /api/v1/audit), so
# that an approval made with impersonation (kubectl --as) records who really made it
# (operator/rl_operator/audit.py). Only Rollout update/patch by anyone but the operator is
# logged, at level Request (the annotations in the request body are what the operator reads).
# The API server sends its bearer token over TLS only: the receiver serves HTTPS with a
# certificate made here ($clusterdir/audit-certs, the operator's RLOPS_AUDIT_CERT_DIR). Its port
# is fixed per cluster (the demo's 8091, others 8191; RLOPS_AUDIT_PORT), written to
# $clusterdir/audit-port for the operator; the token goes into Secret rlops-system/rlops-audit.
audit_port=${RLOPS_AUDIT_PORT:-$([ "$cluster_name" = rlops ] && echo 8091 || echo 8191)}
write_audit_config() {
  echo "$audit_port" >"$clusterdir/audit-port"
  "$venv/bin/python" -c 'import sys; from rl_operator.certs import ensure_webhook_certs; ensure_webhook_certs(sys.argv[1], ["127.0.0.1"])' \
    "$clusterdir/audit-certs"
  [ -s "$clusterdir/audit-token" ] || "$venv/bin/python" -c 'import secrets; print(secrets.token_hex(24))' \
    >"$clusterdir/audit-token"
  cat >"$clusterdir/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted, Panic]
rules:
- level: None
  users: ["system:serviceaccount:rlops-system:rlops-operator"]
- level: Request
  verbs: [update, patch]
  resources:
  - group: rlops.dev
    resources: [rollouts]
- level: None
EOF
  cat >"$clusterdir/audit-webhook.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rlops-operator
  cluster: {server: "https://127.0.0.1:$audit_port/api/v1/audit", certificate-authority: "$clusterdir/audit-certs/ca.crt"}
users:
- name: kube-apiserver
  user: {token: "$(cat "$clusterdir/audit-token")"}
contexts:
- name: default
  context: {cluster: rlops-operator, user: kube-apiserver}
current-context: default
EOF
}

# The API server's client certificate for admission webhooks (its AdmissionConfiguration): the
# approval webhook accepts only callers with a certificate of this CA ($clusterdir/webhook-client:
# ca.crt, the operator's RLOPS_WEBHOOK_CLIENT_CA), so no pod can ask it for a review.
write_admission_config() {
  "$venv/bin/python" -m rl_operator.certs client "$clusterdir/webhook-client" kube-apiserver-webhook-client >/dev/null
  cat >"$clusterdir/webhook-client.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: "*"
  user: {client-certificate: "$clusterdir/webhook-client/tls.crt", client-key: "$clusterdir/webhook-client/tls.key"}
EOF
  cat >"$clusterdir/admission-config.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: "$clusterdir/webhook-client.kubeconfig"
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: "$clusterdir/webhook-client.kubeconfig"
EOF
}

if kubectl get --raw /readyz >/dev/null 2>&1; then
  say "cluster '$cluster_name' already running (KUBECONFIG=$KUBECONFIG)"
else
  if kwokctl get clusters 2>/dev/null | grep -qx "$cluster_name"; then
    say "restarting stopped cluster '$cluster_name'"
    kwokctl start cluster --wait 2m >"$clusterdir/kwokctl.log" 2>&1 || { tail -20 "$clusterdir/kwokctl.log"; exit 1; }
  else
    say "creating cluster '$cluster_name' (kwokctl --runtime binary; RBAC on; audit webhook -> operator)"
    mkdir -p "$(dirname "$KUBECONFIG")" "$clusterdir"
    write_audit_config
    write_admission_config
    # The API server's certificate also names the kubernetes Service's ClusterIP and the real
    # node's bridge address (pods reach the API at either), and it reaches kubelets
    # (hack/node-up.sh: logs, exec) by InternalIP with a client certificate from the cluster's CA.
    pki="$KWOK_WORKDIR/clusters/$cluster_name/pki"
    cat >"$clusterdir/kwokctl.yaml" <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  kubeApiserverCertSANs: ["10.0.0.1", "10.88.0.1"]
EOF
    # RLOPS_KWOK_STAGES: a file of kwok Stages for this cluster (the scale benchmark's fake
    # trainer, hack/bench/kwok-stages.yaml). kwok then uses those instead of its default ones.
    if [ -n "${RLOPS_KWOK_STAGES:-}" ]; then
      { echo "---"; cat "$RLOPS_KWOK_STAGES"; } >>"$clusterdir/kwokctl.yaml"
    fi
    # kwokctl 0.8 indexes each component's extra args by the position of its first --extra-args
    # flag: the Nth component's first flag must come Nth (else it panics).
    # The controller manager and the scheduler run with leader election off: each is the only
    # one, and kwokctl's binary runtime does not restart a process that exits. With it on, a
    # lease renewal that misses its 10 s deadline (etcd slow on a loaded 2-core machine: a
    # trainer, image imports) makes the process exit ("leaderelection lost"), and from then on
    # no Job gets a pod, no claim binds and no Deployment rolls.
    # Each controller acts as its own ServiceAccount (use-service-account-credentials), as
    # kubeadm and managed clusters run them: the reserved labels of rlops's pods are the Job
    # controller's (system:serviceaccount:kube-system:job-controller) to set, not any admin's.
    kwokctl create cluster --runtime binary --config "$clusterdir/kwokctl.yaml" \
      --kubeconfig "$KUBECONFIG" \
      --etcd-binary "$bindir/etcd" \
      --kube-apiserver-binary "$bindir/kube-apiserver" \
      --kube-controller-manager-binary "$bindir/kube-controller-manager" \
      --kube-scheduler-binary "$bindir/kube-scheduler" \
      --kwok-controller-binary "$bindir/kwok" \
      --kube-authorization=true \
      --extra-args kwok-controller=manage-all-nodes=false \
      --extra-args "kube-apiserver=audit-policy-file=$clusterdir/audit-policy.yaml" \
      --extra-args kube-controller-manager=leader-elect=false \
      --extra-args kube-scheduler=leader-elect=false \
      --extra-args kube-controller-manager=use-service-account-credentials=true \
      --extra-args kwok-controller=manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
      --extra-args "kube-apiserver=audit-webhook-config-file=$clusterdir/audit-webhook.kubeconfig" \
      --extra-args kube-apiserver=audit-webhook-batch-max-wait=1s \
      --extra-args "kube-apiserver=admission-control-config-file=$clusterdir/admission-config.yaml" \
      --extra-args "kube-apiserver=kubelet-client-certificate=$pki/admin.crt" \
      --extra-args "kube-apiserver=kubelet-client-key=$pki/admin.key" \
      --extra-args kube-apiserver=kubelet-preferred-address-types=InternalIP \
      --wait 2m >"$clusterdir/kwokctl.log" 2>&1 || { tail -20 "$clusterdir/kwokctl.log"; exit 1; }
  fi
fi
for _ in $(seq 60); do kubectl get ns default >/dev/null 2>&1 && break; sleep 1; done
if [ -s "$clusterdir/audit-token" ]; then
  kubectl create namespace rlops-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n rlops-system create secret generic rlops-audit --from-file=token="$clusterdir/audit-token" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
fi
kubectl apply -f "$root/hack/kwok-gpu-nodes.yaml" >/dev/null
say "control plane up: $(kubectl version -o json | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])' 2>/dev/null || echo '?')"
say "export KUBECONFIG=$KUBECONFIG"
