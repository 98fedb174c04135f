"""Operator settings: one dataclass, read from the environment once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatorSettings:
    artifact_root: str = "file:///var/lib/rlops/artifacts"
    """Where training artifacts go (an fsspec URI root). Each run writes under
    ``<artifact_root>/<namespace>/<agent>/<run>-<uid8>/``. Env: ``RLOPS_ARTIFACT_ROOT``."""

    artifact_pvc: str | None = None
    """If set, this PersistentVolumeClaim is mounted in training pods at the local path of a
    ``file://`` ``artifact_root`` (so trainer and serving pods see the same files).
    Env: ``RLOPS_ARTIFACT_PVC``."""

    trainer_command: tuple[str, ...] = ("python", "-m", "rl_engine.train")
    """The training container's command. Env: ``RLOPS_TRAINER_COMMAND`` (space separated)."""

    evaluator_image: str = "ghcr.io/rlops/engine:0.1.0"
    """The image of the operator's evaluation Jobs (``python -m rl_engine.evaluate``), which
    measure every trained artifact before it may be rolled out: the platform's engine image,
    never a tenant's (the chart pins it). Env: ``RLOPS_EVALUATOR_IMAGE``."""

    trainer_uid: int = 1000
    """Non-root user id the training container runs as (``securityContext.runAsUser``)."""

    resync_seconds: float = 15.0
    """Period (seconds) of the safety-net resync of unfinished TrainingRuns, on top of watch events.
    Env: ``RLOPS_RESYNC_SECONDS``."""

    ray_dashboard_url: str = "http://127.0.0.1:8265"
    """Ray dashboard (Serve's declarative REST API). Env: ``RLOPS_RAY_DASHBOARD_URL``."""

    prometheus_url: str = "http://127.0.0.1:9090"
    """Prometheus for canary analysis. Env: ``RLOPS_PROMETHEUS_URL``."""

    rollout_interval_seconds: float = 2.0
    """Period (seconds) of the Rollout reconcile while a rollout is in progress.
    Env: ``RLOPS_ROLLOUT_INTERVAL_SECONDS``."""

    workers: int = 32
    """Threads that run the reconciles (kopf's executor for sync handlers): at most this many
    objects are reconciled at once; events for one object are always handled in order, one at
    a time. The approval webhook has its own threads. A reconcile spends most of its time
    waiting for the API server, so threads beyond the cores pay: with 500 agents at once, 32
    cut the p99 from apply to Job from 29 s to 19 s against 8 (``make bench-scale``).
    Env: ``RLOPS_WORKERS``."""

    webhook_addr: str | None = "127.0.0.1"
    """Address of the admission webhook server (HTTPS); empty disables the webhooks (no approval
    by annotation is then possible). Env: ``RLOPS_WEBHOOK_ADDR``."""

    webhook_port: int = 9443
    """Port of the admission webhook server. Env: ``RLOPS_WEBHOOK_PORT``."""

    webhook_service: str | None = None
    """``namespace/name:port`` of a Service in front of the webhook server (in a cluster: the
    chart's ``rlops-system/rlops-operator:443``). When set, the webhook configuration points at
    that Service instead of a URL; the certificate names ``<name>.<namespace>.svc``.
    Env: ``RLOPS_WEBHOOK_SERVICE``."""

    webhook_host: str | None = None
    """Host name the API server uses to reach the webhook (default: ``webhook_addr``); the
    serving certificate is made for it. Env: ``RLOPS_WEBHOOK_HOST``."""

    webhook_cert_secret: str | None = None
    """``namespace/name`` of a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``, ``ca.crt``)
    holding the webhook's certificate, so that every replica and restart serves the same CA. The
    operator creates it when missing and renews it 30 days before it expires (a running operator
    restarts itself onto a renewed one). Empty: a certificate in ``cert_dir`` only, new at each
    start of a fresh container. Env: ``RLOPS_WEBHOOK_CERT_SECRET``."""

    webhook_client_ca: str | None = None
    """A PEM file of the CA that signs the API server's client certificate for webhooks (its
    AdmissionConfiguration's kubeconfig): the approval webhook then accepts only callers with a
    certificate from it. Empty: any caller that reaches the port (keep it behind the chart's
    NetworkPolicy). Env: ``RLOPS_WEBHOOK_CLIENT_CA``."""

    webhook_cert_managed: bool = False
    """The webhook certificate Secret is issued by cert-manager: the operator only reads it (and
    waits for it), never writes it. Env: ``RLOPS_WEBHOOK_CERT_MANAGED=1``."""

    peering_lifetime_seconds: int = 10
    """With peering (``--peering``, two replicas): how long a replica's keep-alive record counts
    before the standby takes over from a replica that died without saying so (SIGKILL, a lost
    node). Env: ``RLOPS_PEERING_LIFETIME_SECONDS``."""

    cert_dir: str = "/tmp/rlops-webhook-certs"
    """Where the webhook's CA and serving certificate are made and kept. Env: ``RLOPS_CERT_DIR``."""

    alert_receiver: str | None = "127.0.0.1:8090"
    """``host:port`` of the Alertmanager webhook receiver; empty disables it.
    Env: ``RLOPS_ALERT_RECEIVER``."""

    alert_token_secret: str = "rlops-system/rlops-alertmanager"
    """``namespace/name`` of the Secret whose ``token`` key Alertmanager sends as bearer token.
    Env: ``RLOPS_ALERT_TOKEN_SECRET``."""

    metrics_addr: str | None = None
    """``host:port`` where the operator serves its Prometheus metrics (``/metrics``,
    ``rl_operator.metrics``); empty (the default) disables it. Env: ``RLOPS_METRICS_ADDR``."""

    audit_receiver: str | None = None
    """``host:port`` of the HTTPS receiver for the API server's audit webhook (``POST
    /api/v1/audit``: who made an approval with impersonation, ``rl_operator.audit``); empty (the
    default) disables it. Env: ``RLOPS_AUDIT_RECEIVER``."""

    audit_cert_dir: str | None = None
    """Directory of the audit receiver's serving certificate (``ca.crt``, ``tls.crt``,
    ``tls.key``; created for ``host`` when missing). Default: ``<cert_dir>/audit``.
    Env: ``RLOPS_AUDIT_CERT_DIR``."""

    audit_token_secret: str = "rlops-system/rlops-audit"
    """``namespace/name`` of the Secret whose ``token`` key the API server's audit webhook sends as
    bearer token. Env: ``RLOPS_AUDIT_TOKEN_SECRET``."""

    approval_key_secret: str = "rlops-system/rlops-approval-key"
    """``namespace/name`` of the Secret (key ``key``) that holds the operator's signing key: the
    admission webhook signs the approvals it records with it, and per-application feedback keys
    are derived from it. Created with a random key when missing. Env: ``RLOPS_APPROVAL_KEY_SECRET``."""

    namespaces: tuple[str, ...] = ()
    """The namespaces this operator serves (``-n``/``--namespace``, repeatable); empty: every
    namespace. Its watches, its webhook (a ``namespaceSelector``), its alert and audit receivers
    all stay inside them. Env: ``RLOPS_NAMESPACES`` (comma separated)."""

    shard: str | None = None
    """Name of this operator's shard, when several operators split the cluster's namespaces
    (each with its own ``namespaces`` and its own Ray cluster). It names the shard's webhook
    configuration (``<shard>.rlops.dev``) and its claim on the Ray cluster. Needs ``namespaces``.
    Env: ``RLOPS_SHARD``."""

    operator_namespace: str = "rlops-system"
    """Namespace of the operator's own objects (the Ray cluster claims of shards).
    Env: ``RLOPS_OPERATOR_NAMESPACE``."""

    kill_switch_configmap: str = "rlops-kill-switch"
    """ConfigMap (in ``operator_namespace``) of the global kill switch: ``data.engaged: "true"``
    freezes every Rollout with all traffic on stable, ``data.reason`` says why. Read every
    ``kill_switch_poll_seconds``. Env: ``RLOPS_KILL_SWITCH_CONFIGMAP``."""

    kill_switch_poll_seconds: float = 2.0
    """Period (seconds) of the kill switch's read. Env: ``RLOPS_KILL_SWITCH_POLL_SECONDS``."""

    nats_url: str | None = None
    """NATS server with JetStream (``nats://host:4222``) for the trajectory trigger
    (``spec.triggers.trajectories``) and the events out; unset: neither works.
    Env: ``RLOPS_NATS_URL``."""

    nats_events: bool = False
    """Publish the operator's events (``agent.rl.training.request.v1``,
    ``agent.rl.training.status.v1``, ``agent.rl.model.deployed.v1``) to ``nats_url``.
    Env: ``RLOPS_NATS_EVENTS`` (``1`` or ``true``)."""

    extra_env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for training pods, from ``RLOPS_TRAINER_ENV_<NAME>=value``
    (e.g. a Python path or a CUDA setting the cluster needs)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "OperatorSettings":
        env = dict(os.environ if env is None else env)
        prefix = "RLOPS_TRAINER_ENV_"
        command = env.get("RLOPS_TRAINER_COMMAND")
        return cls(
            artifact_root=env.get("RLOPS_ARTIFACT_ROOT", cls.artifact_root),
            artifact_pvc=env.get("RLOPS_ARTIFACT_PVC") or None,
            trainer_command=tuple(command.split()) if command else cls.trainer_command,
            evaluator_image=env.get("RLOPS_EVALUATOR_IMAGE") or cls.evaluator_image,
            resync_seconds=float(env.get("RLOPS_RESYNC_SECONDS", cls.resync_seconds)),
            ray_dashboard_url=env.get("RLOPS_RAY_DASHBOARD_URL", cls.ray_dashboard_url),
            prometheus_url=env.get("RLOPS_PROMETHEUS_URL", cls.prometheus_url),
            rollout_interval_seconds=float(env.get("RLOPS_ROLLOUT_INTERVAL_SECONDS", cls.rollout_interval_seconds)),
            workers=int(env.get("RLOPS_WORKERS", cls.workers)),
            webhook_addr=env.get("RLOPS_WEBHOOK_ADDR", cls.webhook_addr) or None,
            webhook_port=int(env.get("RLOPS_WEBHOOK_PORT", cls.webhook_port)),
            webhook_host=env.get("RLOPS_WEBHOOK_HOST") or None,
            webhook_service=env.get("RLOPS_WEBHOOK_SERVICE") or None,
            webhook_cert_secret=env.get("RLOPS_WEBHOOK_CERT_SECRET") or None,
            webhook_cert_managed=env.get("RLOPS_WEBHOOK_CERT_MANAGED", "") in ("1", "true"),
            webhook_client_ca=env.get("RLOPS_WEBHOOK_CLIENT_CA") or None,
            peering_lifetime_seconds=int(env.get("RLOPS_PEERING_LIFETIME_SECONDS", cls.peering_lifetime_seconds)),
            cert_dir=env.get("RLOPS_CERT_DIR", cls.cert_dir),
            alert_receiver=env.get("RLOPS_ALERT_RECEIVER", cls.alert_receiver) or None,
            alert_token_secret=env.get("RLOPS_ALERT_TOKEN_SECRET", cls.alert_token_secret),
            metrics_addr=env.get("RLOPS_METRICS_ADDR", "") or None,
            audit_receiver=env.get("RLOPS_AUDIT_RECEIVER", "") or None,
            audit_cert_dir=env.get("RLOPS_AUDIT_CERT_DIR", "") or None,
            audit_token_secret=env.get("RLOPS_AUDIT_TOKEN_SECRET", cls.audit_token_secret),
            approval_key_secret=env.get("RLOPS_APPROVAL_KEY_SECRET", cls.approval_key_secret),
            namespaces=tuple(n.strip() for n in env.get("RLOPS_NAMESPACES", "").split(",") if n.strip()),
            shard=env.get("RLOPS_SHARD") or None,
            operator_namespace=env.get("RLOPS_OPERATOR_NAMESPACE", cls.operator_namespace),
            kill_switch_configmap=env.get("RLOPS_KILL_SWITCH_CONFIGMAP", cls.kill_switch_configmap),
            kill_switch_poll_seconds=float(env.get("RLOPS_KILL_SWITCH_POLL_SECONDS", cls.kill_switch_poll_seconds)),
            nats_url=env.get("RLOPS_NATS_URL") or None,
            nats_events=env.get("RLOPS_NATS_EVENTS", "") in ("1", "true"),
            extra_env={k[len(prefix):]: v for k, v in env.items() if k.startswith(prefix)},
        )
