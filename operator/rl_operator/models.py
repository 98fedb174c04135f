"""The rlops API (group ``rlops.dev``, version ``v1alpha1``): one module, one source of truth.

The pydantic models below define the three custom resources. ``rl_operator.crdgen`` turns
them into the structural CRD schemas in ``crds/`` (``make crds``), so what the API server
validates at admission and what the operator parses are the same definition.

Field names follow the Kubernetes API conventions (camelCase on the wire, ``spec`` is the
user's, ``status`` is the operator's, ``conditions[]`` and ``observedGeneration``) and the RL
field's own terms (environment, episode, return, timesteps).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal, Mapping, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from rl_engine.serving import contract

GROUP = "rlops.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Label put on every child, naming the RLAgent it belongs to.
AGENT_LABEL = f"{GROUP}/agent"
#: Label put on a training Job and its pods, naming the TrainingRun.
RUN_LABEL = f"{GROUP}/training-run"
#: Label on a reclaim Job: the run whose artifact it deletes (it has no RUN_LABEL: no run owns it).
RECLAIM_LABEL = f"{GROUP}/reclaim-of"
#: Label (``"true"``) on a run's evaluation Job and its pod, beside the run's RUN_LABEL.
EVALUATION_LABEL = f"{GROUP}/evaluation"
#: The labels the operator acts on, reserved on Jobs and pods: only the operator sets them on a
#: Job (or its pod template), and a pod carries them only when the Job controller made it for a
#: Job (a ValidatingAdmissionPolicy, ``rl_operator.policygen``). So a tenant can neither make the
#: operator watch and cache objects of its choosing, nor pass a pod off as a trainer.
RESERVED_LABELS = (RUN_LABEL, AGENT_LABEL, RECLAIM_LABEL, EVALUATION_LABEL)
#: The operator's finalizer (kopf's, renamed): a Rollout is born with it; an agent gets it while
#: it serves or may serve. A ValidatingAdmissionPolicy lets only the operator remove it.
FINALIZER = f"{GROUP}/finalizer"

#: The operator's identity (its ServiceAccount): the only user that creates TrainingRuns and Rollouts.
OPERATOR_NAMESPACE = "rlops-system"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:rlops-operator"

DEFAULT_TRAINER_IMAGE = "ghcr.io/rlops/engine:0.1.0"

#: Schema marker: an optional sub-object that must not default to ``{}`` in the CRD (one-of members).
NO_DEFAULT = "x-rlops-no-default"

#: Stored as free-form JSON in the CRD schema (``x-kubernetes-preserve-unknown-fields``).
FREE_FORM = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _scalar(x: str, max_length: int) -> str:
    return f"(type({x}) != list && type({x}) != map && (type({x}) != string || size({x}) <= {max_length}))"


#: The most names in a free-form map of keyword arguments (``kwargs``, ``hyperparameters``).
FREE_FORM_MAX_PROPERTIES = 32
#: Stored as free-form JSON, with at most :data:`FREE_FORM_MAX_PROPERTIES` names.
BOUNDED_FREE_FORM = {**FREE_FORM, "maxProperties": FREE_FORM_MAX_PROPERTIES}


def free_form_bound(expr: str) -> str:
    """CEL that holds when the free-form map ``expr`` stays small, whatever a tenant writes (what
    the operator caches of each agent is bounded): each name at most 128 characters, each value a
    scalar (a string of at most 4096 characters), a list of at most 256 scalars (strings of at
    most 256), or a map of at most 32 such scalars. A CRD's own rules cannot look inside
    free-form values (they have no type), so a ValidatingAdmissionPolicy applies this
    (``rl_operator.policygen``)."""
    value = f"{expr}[k]"
    return (f"{expr}.all(k, size(k) <= 128 && (type({value}) == list ? size({value}) <= 256 && {value}.all(x, "
            f"{_scalar('x', 256)}) : type({value}) == map ? size({value}) <= 32 && {value}.all(j, size(j) <= 128 && "
            f"{_scalar(f'{value}[j]', 256)}) : {_scalar(value, 4096)}))")


FREE_FORM_BOUND_MESSAGE = ("each value must be a number, a boolean, a string (at most 4096 characters), a list of at "
                           "most 256 of those (strings of at most 256) or a map of at most 32 of those; names at most "
                           "128 characters")


def digest(value: Any) -> str:
    """``sha256:<hex>`` of ``value``'s canonical JSON (sorted keys, no spaces): what the operator
    keeps in memory instead of a large value it only ever compares (``rl_operator.cache``,
    ``rl_operator.diffbase``)."""
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: The free-form maps of an RLAgent's or TrainingRun's spec, as ``(parent, name)``: the large parts
#: a tenant controls.
FREE_FORM_FIELDS = (("environment", "kwargs"), ("algorithm", "hyperparameters"))


def rfc3339(t: datetime) -> str:
    """A time as the Kubernetes API writes one: RFC 3339, UTC, whole seconds (``2026-12-04T12:00:00Z``).
    A naive datetime is taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


_WIRE = ConfigDict(alias_generator=to_camel, populate_by_name=True, validate_assignment=True)


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are refused."""

    model_config = ConfigDict(**_WIRE, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict as it appears in the Kubernetes API (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class _Status(_Model):
    # Status written by newer operator versions may carry fields this one does not know.
    model_config = ConfigDict(**_WIRE, extra="ignore")


# ----------------------------------------------------------------------------- spec parts


class EnvironmentSpec(_Model):
    """Which environment the agent acts in."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.numEnvs) || self.numEnvs <= 1024 || (has(self.backend) && self.backend == 'torch')",
                    "numEnvs above 1024 needs backend: torch (the gymnasium backend keeps one Python object per copy)",
                    ".numEnvs",
                )
            ]
        },
    )

    id: str = Field(
        min_length=1,
        max_length=253,
        description="Gymnasium registry id (e.g. CartPole-v1) or a 'module:Class' entry point.",
    )
    num_envs: int = Field(8, ge=1, le=65536, description="Environments stepped in parallel (vector env).")
    backend: Literal["gymnasium", "torch"] = Field(
        "gymnasium",
        description=(
            "gymnasium: a SyncVectorEnv of Gymnasium envs; torch: all copies step as tensor ops on the "
            "training device (CartPole-v1)."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=("Keyword arguments passed to the environment's constructor: at most 32, each a number, a "
                     "boolean, a string, a list of those or a map of those."),
        json_schema_extra=BOUNDED_FREE_FORM,
    )


class AlgorithmSpec(_Model):
    """The RL algorithm and its hyperparameters."""

    name: Literal["PPO", "DQN"] = Field("PPO", description="The RL algorithm.")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Algorithm hyperparameters in camelCase (e.g. learningRate, gaeLambda); the trainer "
            "refuses unknown names. Omitted ones take the trainer's defaults."
        ),
        json_schema_extra=BOUNDED_FREE_FORM,
    )


def _positive_quantity(what: str) -> dict[str, Any]:
    """CEL: the string is a Kubernetes quantity above zero (the Job would refuse anything else)."""
    return {"x-kubernetes-validations": [
        _cel("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
             f"{what} must be a Kubernetes quantity above zero (e.g. 500m, 2, 4Gi)")]}


#: A label value (Kubernetes: at most 63 characters, alphanumeric at both ends, ``-_.`` inside).
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: A label key: an optional DNS-subdomain prefix and ``/``, then a name of at most 63 characters.
LABEL_KEY_CEL = (
    "self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))"
)


class ResourceSpec(_Model):
    """Compute for one training pod."""

    gpu: int = Field(1, ge=0, le=64, description="nvidia.com/gpu count (limit) for the training pod.")
    cpu: str = Field("1", min_length=1, max_length=32, json_schema_extra=_positive_quantity("cpu"),
                     description="CPU request and limit (Kubernetes quantity above zero, e.g. 500m or 2).")
    memory: str = Field("2Gi", min_length=1, max_length=32, json_schema_extra=_positive_quantity("memory"),
                        description="Memory request and limit (Kubernetes quantity above zero, e.g. 2Gi).")


class Toleration(_Model):
    """A pod toleration (core/v1 Toleration), copied into the training pod."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": [
            _cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                 "value must be empty when operator is Exists", ".value"),
            _cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                 "tolerationSeconds needs effect NoExecute", ".tolerationSeconds"),
            _cel("has(self.key) || (has(self.operator) && self.operator == 'Exists')",
                 "an empty key needs operator Exists", ".key"),
        ]},
    )

    key: str | None = Field(None, max_length=316, description="The taint key to tolerate (empty: all keys, with Exists).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE, description="The taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="The taint effect to tolerate (empty: all effects).")
    toleration_seconds: int | None = Field(None, ge=0, description="How long a NoExecute taint is tolerated (seconds).")


class TrainingTemplate(_Model):
    """What one TrainingRun snapshots from its agent: budget, image, resources, placement."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.evalInterval) || !has(self.totalTimesteps) || self.evalInterval <= self.totalTimesteps",
                    "evalInterval must not exceed totalTimesteps",
                    ".evalInterval",
                )
            ]
        },
    )

    total_timesteps: int = Field(500_000, ge=1, description="Training budget in environment steps.")
    seed: int = Field(1, ge=0, description="Seed for the environments, network init and sampling.")
    target_return: float | None = Field(
        None, description="Stop early once a periodic evaluation's mean episodic return reaches this."
    )
    eval_interval: int = Field(10_240, ge=1, description="Environment steps between periodic evaluations.")
    image: str = Field(
        DEFAULT_TRAINER_IMAGE, min_length=1, max_length=512, pattern=r"^[^\s]+$",
        description="Trainer container image (a reference without whitespace).",
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    backoff_limit: int = Field(0, ge=0, le=10, description="Job backoffLimit: retries of a failed pod.")
    active_deadline_seconds: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Job activeDeadlineSeconds (seconds)."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Added to the GPU node selector of the training pod (label keys and values).",
        json_schema_extra={"x-kubernetes-validations": [_cel(LABEL_KEY_CEL, "keys must be label keys")]},
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Added to the nvidia.com/gpu toleration of the training pod."
    )


class EvaluationSpec(_Model):
    """How the trained policy is evaluated before it may be rolled out."""

    episodes: int = Field(20, ge=1, le=10_000, description="Deterministic evaluation episodes.")
    min_mean_return: float | None = Field(
        None, description="Minimum mean evaluation return for a run to be eligible for rollout."
    )


class AutoApproval(_Model):
    """Thresholds for approving a trained policy without a human (auto-approval policies).

    Every threshold that is set must hold; unset thresholds are not checked. With a stable
    version serving, the relative checks compare against its evaluation.
    """

    min_mean_return: float | None = Field(None, description="Minimum mean evaluation return.")
    min_improvement_over_stable: float | None = Field(
        None, description="Minimum (canary - stable) mean evaluation return, in return units; may be negative."
    )
    min_relative_improvement_over_stable: float | None = Field(
        None, description="Minimum (canary - stable) / |stable| mean evaluation return, as a fraction (0.05 = 5%)."
    )
    allow_untrusted_evaluation: bool | None = Field(None, description=(
        "true: also approve a policy whose evaluation ran in the tenant's own trainer image (its environment "
        "needs the tenant's code: an entry point outside rl_engine), so that the figures come from code the "
        "tenant controls. Unset or false: such a policy waits for a person."))


#: The user name prefix of every ServiceAccount in Kubernetes authentication.
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
#: A ServiceAccount's user name in Kubernetes authentication.
SERVICE_ACCOUNT_USER = r"^system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class ApprovalPolicy(_Model):
    """How a trained policy is approved for rollout."""

    mode: Literal["manual", "auto"] = Field(
        "manual",
        description="manual: kubectl annotate rollout/<name> rlops.dev/approve=<fingerprint>; auto: the thresholds below.",
    )
    auto: AutoApproval = Field(default_factory=AutoApproval)
    allowed_service_accounts: list[Annotated[str, Field(pattern=SERVICE_ACCOUNT_USER, max_length=317)]] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "ServiceAccounts (system:serviceaccount:<namespace>:<name>) whose approvals count. Approvals by "
            "any other ServiceAccount are refused, so that a workload cannot approve on a person's behalf."
        ),
    )


class PauseStep(_Model):
    duration_seconds: int | None = Field(
        None, ge=0, le=7 * 24 * 3600,
        description="Pause length in seconds; unset waits for the rlops.dev/promote annotation.",
    )


class CanaryStep(_Model):
    """One canary step; exactly one of its fields is set (like Argo Rollouts' CanaryStep)."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("has(self.setWeight) != has(self.pause)", "exactly one of setWeight or pause must be set")
            ]
        },
    )

    set_weight: int | None = Field(None, ge=0, le=100, description="Canary traffic weight (percent).")
    pause: PauseStep | None = Field(
        None, description="Pause before the next step.", json_schema_extra={NO_DEFAULT: True}
    )


def _default_steps() -> list[CanaryStep]:
    # seed 004's canary schedule (10% -> 25% -> 50% -> 100%), with minutes instead of hours
    steps: list[CanaryStep] = []
    for weight in (10, 25, 50):
        steps += [CanaryStep(set_weight=weight), CanaryStep(pause=PauseStep(duration_seconds=60))]
    return steps + [CanaryStep(set_weight=100)]


class RewardRange(_Model):
    """The declared range of the feedback reward (``POST /<namespace>/<agent>/feedback``), in reward units."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [_cel("!has(self.min) || !has(self.max) || self.min < self.max",
                 "rewardRange.min must be less than rewardRange.max")]
        },
    )

    min: float = Field(
        -1.0, allow_inf_nan=False, description="Lowest reward a feedback may carry; a lower one is refused (HTTP 400)."
    )
    max: float = Field(
        1.0, allow_inf_nan=False, description="Highest reward a feedback may carry; a higher one is refused (HTTP 400)."
    )


class FeedbackPerClientSpec(_Model):
    """How much feedback one client may send: a share of the samples the analysis compares."""

    max_per_minute: int = Field(
        contract.DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE, ge=0, le=contract.MAX_FEEDBACK_PER_CLIENT_PER_MINUTE,
        description=(
            "A client may send at most this many feedbacks per minute to one router replica (counted from its "
            "first feedback of the minute); more get HTTP 429 and are not counted, and their request ids stay "
            "usable until the feedback TTL. This bounds how much of a version's feedback one client supplies. "
            "0: no cap."))
    client_header: str = Field(
        "", max_length=contract.MAX_HEADER_NAME_LENGTH, pattern=contract.HEADER_NAME_PATTERN,
        description=(
            "Empty: a client is the source address of its request, as Ray Serve sees it (behind a gateway or a "
            "load balancer that hides client addresses, every client is that one address). Otherwise the name of "
            "an HTTP header whose value names the client (the last comma-separated element, e.g. of "
            "X-Forwarded-For); a request without it counts by its address. Name a header only a trusted gateway in "
            "front of Ray Serve sets, overwriting what clients send: a client that can set it can claim any "
            "number of clients."))


class AnalysisSpec(_Model):
    """Checks run against Prometheus while the canary takes traffic (defaults: the usual rollback conditions)."""

    # Defaults: seed 004's rollback conditions (this comment stays out of the CRD description).

    interval_seconds: int = Field(5, ge=1, le=3600, description="Seconds between analysis queries.")
    window_seconds: int = Field(60, ge=5, le=3600, description="Longest look-back of each query (seconds).")
    min_sample_count: int = Field(
        100, ge=1, description="Canary requests needed in the window before a verdict; fewer is Inconclusive."
    )
    max_error_rate: float = Field(0.05, ge=0, le=1, description="The canary fails above this error rate (fraction).")
    max_reward_drop: float = Field(
        0.05,
        ge=0,
        description=(
            "The canary fails when its reward (the 10%-trimmed mean of its feedback rewards) is below the "
            "stable's minus this (reward units)."
        ),
    )
    max_negative_feedback_ratio: float = Field(
        2.0, ge=1, description="The canary fails when its negative-feedback rate exceeds this times the stable's."
    )
    reward_range: RewardRange = Field(
        default_factory=RewardRange,
        description=(
            "The range of the feedback reward: the router refuses a reward outside it (HTTP 400), and the "
            "analysis measures rewards within it."
        ),
    )
    max_override_rate: float = Field(
        0.2, ge=0, le=1, description=(
            "The canary fails when it overrides the stable version (chooses another action for the same "
            "observation) in more than this fraction of its compared answers. Every canary answer is also asked "
            "of the stable version, off the response path, to count that. 1: no limit and no comparison."))
    # Argo Rollouts' consecutiveErrorLimit (default 4): a canary is not left taking traffic unmeasured.
    consecutive_error_limit: int = Field(
        4, ge=0, le=100, description=(
            "The canary is rolled back when more than this many measurements in a row could not be taken "
            "(Prometheus unreachable, or a query failing), one every intervalSeconds: a canary does not keep its "
            "traffic unmeasured. A measurement that succeeds, whatever its verdict, starts the count again."))
    feedback_per_client: FeedbackPerClientSpec = Field(
        default_factory=FeedbackPerClientSpec,
        description=(
            "A cap on the feedback of each client (POST /<namespace>/<agent>/feedback), so that one client cannot "
            "supply most of the feedback the analysis compares. Applied when the Serve application is next "
            "deployed (a canary starting or ending)."))


class CircuitBreakerSpec(_Model):
    """The router's circuit breaker, while a canary takes traffic beside a stable version."""

    consecutive_errors: int = Field(
        5, ge=0, le=1000, description=(
            "A canary request that fails (HTTP 5xx, or no answer within timeoutSeconds) is answered by the stable "
            "version instead, so the client sees no error; this many consecutive canary failures open the breaker: "
            "the router itself sends all traffic to the stable version, and the operator then rolls the canary "
            "back. 0: no breaker (canary failures reach the clients)."))
    timeout_seconds: float = Field(
        2.0, gt=0, le=60, description=(
            "A canary request without an answer after this many seconds counts as a failure: the router stops "
            "waiting for the canary and answers from the stable version."))


class CanarySpec(_Model):
    """The canary plan: traffic steps and the analysis that gates them."""

    steps: list[CanaryStep] = Field(
        default_factory=_default_steps,
        max_length=32,
        description="Traffic steps; the last should be setWeight 100 (promotion).",
        json_schema_extra={"default": [step.wire() for step in _default_steps()]},
    )
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    circuit_breaker: CircuitBreakerSpec = Field(default_factory=CircuitBreakerSpec)


class ObserveSpec(_Model):
    """Graduation from shadow (observe) mode: when a candidate that shadows the stable version may go on
    to approval and its canary."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": [_cel(
            "!has(self.minAgreement) || !has(self.maxAgreement) || self.minAgreement <= self.maxAgreement",
            "observe.minAgreement must be at most observe.maxAgreement")]},
    )

    min_decisions: int = Field(
        200, ge=1, le=10_000_000, description="Compared decisions (answers the shadow was also asked) needed first.")
    min_agreement: float = Field(
        0.80, ge=0, le=1, description="The shadow must choose the stable version's action at least this often.")
    max_agreement: float = Field(
        0.95, ge=0, le=1, description=(
            "... and at most this often (a candidate that always agrees adds nothing; 1 turns this off)."))
    min_override_accuracy: float = Field(
        0.60, ge=0, le=1, description=(
            "When the shadow disagreed, the fraction of those answers where it was right: the feedback on the "
            "stable version's answer was negative or below the middle of the reward range."))
    min_override_feedback: int = Field(
        10, ge=0, le=1_000_000, description=(
            "Feedbacks on disagreements needed before the override accuracy counts (0: graduate without any)."))


class ServingSpec(_Model):
    """How the agent is served on Ray Serve (one application per agent)."""

    enabled: bool = Field(True, description="Serve approved policies (false: train and evaluate only).")
    max_batch_size: int = Field(32, ge=1, le=4096, description="@serve.batch max_batch_size of policy deployments.")


class ScheduleTrigger(_Model):
    """Retrain on a schedule, with a CronJob's rules for missed times."""

    cron: str = Field(
        min_length=6, max_length=100,
        pattern=r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\s*\S+(\s+\S+){4}\s*)$",
        description=("Five-field cron expression (minute hour day-of-month month day-of-week) or a macro "
                     "(@hourly, @daily, @weekly, @monthly, @yearly), as in a CronJob's schedule, e.g. "
                     "\"0 2 * * *\" (02:00 every day)."))
    time_zone: str = Field(
        "Etc/UTC", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$",
        description="IANA time zone of the cron expression, e.g. Europe/Berlin.")
    starting_deadline_seconds: int | None = Field(
        None, ge=0,
        description=("A scheduled time missed by more than this (operator down, agent suspended, a run in progress "
                     "under concurrencyPolicy Forbid) is skipped. Unset: the most recent missed time always runs, "
                     "once."))


#: NATS names: a JetStream stream name, and a subject without wildcards (dot-separated tokens)
_STREAM_NAME = r"^[A-Za-z0-9_-]+$"
_SUBJECT = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"


class TrajectoryTrigger(_Model):
    """Retrain when enough new trajectories have arrived on a NATS JetStream stream. The operator
    counts them through a durable consumer of its own per agent, created when it first sees
    this trigger: trajectories published before that do not count."""

    threshold: int = Field(
        ge=1, le=1_000_000,
        description=("Start a run when this many trajectories have arrived since the last run this trigger started "
                     "(or since the trigger was first seen). The run trains on all of them."))
    stream: str = Field("RL_TRAJECTORIES", min_length=1, max_length=64, pattern=_STREAM_NAME,
                        description="The JetStream stream that holds the trajectories.")
    subject: str = Field("agent.rl.trajectory.v1", min_length=1, max_length=200, pattern=_SUBJECT,
                         description="The subject of this agent's trajectories within the stream.")


class DegradationTrigger(_Model):
    """Retrain when the active model's live reward falls below its baseline minus a margin."""

    margin: float = Field(0.10, gt=0, le=1e6, description=(
        "Reward units below the baseline that count as degraded: a live reward below baseline - margin "
        "starts a run."))
    window_seconds: int = Field(600, ge=10, le=86400, description=(
        "The live reward is the 10%-trimmed mean of the active model's feedback rewards over this trailing "
        "window (seconds), from Prometheus, as in the canary analysis."))
    min_feedback: int = Field(50, ge=1, le=10_000_000, description=(
        "Feedback samples the window needs before the live reward counts; fewer: no verdict."))
    baseline: float | None = Field(None, description=(
        "A fixed baseline reward. Unset: the active model's live reward over its first full window after it "
        "took all traffic (recorded in status.activeModel.baselineReward)."))


class TriggersSpec(_Model):
    """What starts a TrainingRun besides a change of the training spec (always on) and the
    rlops.dev/retrain annotation (always on: one run per new value)."""

    schedule: ScheduleTrigger | None = Field(None, description="Retrain on a cron schedule.",
                                              json_schema_extra={NO_DEFAULT: True})
    trajectories: TrajectoryTrigger | None = Field(
        None, description="Retrain when a number of new trajectories have arrived on a NATS JetStream stream.",
        json_schema_extra={NO_DEFAULT: True})
    degradation: DegradationTrigger | None = Field(
        None, description="Retrain when the active model's live reward falls below its baseline minus a margin.",
        json_schema_extra={NO_DEFAULT: True})


# ----------------------------------------------------------------------------- shared status


class Condition(_Status):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class ObjectRef(_Model):
    name: str = Field(min_length=1)


# ----------------------------------------------------------------------------- RLAgent


class RLAgentSpec(_Model):
    """The desired agent: environment, algorithm, training template, evaluation and mode."""

    environment: EnvironmentSpec
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    training: TrainingTemplate = Field(default_factory=TrainingTemplate)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    canary: CanarySpec = Field(default_factory=CanarySpec)
    mode: Literal["active", "observe"] = Field(
        "active", description=(
            "active: each new policy is approved and canaried. observe: each new policy first shadows the "
            "stable version (every request is also sent to it, off the response path; clients only get the "
            "stable version's answers) until it meets spec.observe; then it is approved and canaried as in "
            "active mode. An agent without a stable version rolls out its first policy as in active mode."))
    observe: ObserveSpec = Field(default_factory=ObserveSpec, description="Graduation criteria of observe mode.")
    triggers: TriggersSpec = Field(default_factory=TriggersSpec)
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = Field(
        "Replace", description=(
            "When a trigger fires while a TrainingRun of the agent is Pending or Running: Replace (the default) "
            "supersedes it (its Job is deleted, its phase is Superseded) and starts the new run; Forbid makes the "
            "trigger wait until no run is in progress; Allow starts the new run beside it."))
    successful_runs_history_limit: int = Field(
        3, ge=0, le=100, description=(
            "Succeeded TrainingRuns kept (with their Jobs and Rollouts); older ones are deleted. The agent's "
            "latest run, its active model's run and a run whose Rollout is not finished are always kept."))
    failed_runs_history_limit: int = Field(
        1, ge=0, le=100, description="Failed and Superseded TrainingRuns kept; older ones are deleted.")
    artifact_reclaim_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description=(
            "The artifact of a TrainingRun deleted over the history limits: Retain (the default) keeps it in the "
            "artifact store, where it can still be audited by its fingerprint; Delete removes its directory, with a "
            "short Job (rlops-reclaim-<run uid>, no GPU) that mounts the artifact store as training does."))
    suspend: bool = Field(
        False, description=("true: no new TrainingRun and no new Rollout start; due triggers wait (a scheduled "
                            "time within its startingDeadlineSeconds still runs on resume)."))


class ActiveModel(_Status):
    """The version serving 100% of the agent's traffic (the stable version)."""

    version: str
    fingerprint: str
    artifact_uri: str = Field(alias="artifactURI")
    rollout: str | None = None
    mean_return: float | None = None
    promoted_at: datetime | None = None
    baseline_reward: float | None = Field(None, description=(
        "Its live reward (10%-trimmed mean of the feedback rewards) over the first full window of "
        "spec.triggers.degradation after it took all traffic: the degradation trigger's baseline."))
    baseline_measured_at: datetime | None = None
    degraded_at: datetime | None = Field(None, description=(
        "When the degradation trigger started a run for it (once per active model)."))


class ShadowSummary(_Status):
    """The agent's latest shadow, for ``kubectl get rla``."""

    rollout: str
    progress: str = ""
    graduated_at: datetime | None = None


#: An RLAgent's phases (``training.observe_agent``). None (no status yet) is read as Pending.
AgentPhase = Literal["Pending", "Training", "Evaluating", "Trained", "Failed"]


class RLAgentStatus(_Status):
    phase: AgentPhase | None = None
    observed_generation: int | None = None
    latest_run: str | None = None
    latest_mean_return: float | None = None
    latest_fingerprint: str | None = None
    latest_rollout: str | None = None
    active_model: ActiveModel | None = None
    last_schedule_time: datetime | None = Field(None, description="The last scheduled time a run was started for.")
    last_retrain: str | None = Field(None, description="The last rlops.dev/retrain value a run was started for.")
    shadow: ShadowSummary | None = Field(None, description="The latest shadow (observe mode) and its progress.")
    conditions: list[Condition] = Field(default_factory=list)


class RLAgent(_Status):
    KIND: ClassVar[str] = "RLAgent"
    PLURAL: ClassVar[str] = "rlagents"
    spec: RLAgentSpec
    status: RLAgentStatus = Field(default_factory=RLAgentStatus)


# ----------------------------------------------------------------------------- TrainingRun


class TrajectoryWindow(_Model):
    """The trajectories a run was started for: a range of a JetStream stream's sequence numbers."""

    stream: str = Field(min_length=1, pattern=_STREAM_NAME)
    subject: str = Field(min_length=1, pattern=_SUBJECT)
    first_sequence: int = Field(ge=1, description="Stream sequence number of the first trajectory.")
    last_sequence: int = Field(ge=1, description="Stream sequence number of the last trajectory.")
    count: int = Field(ge=1, description="Number of trajectories on the subject in that range.")


class DegradedModel(_Model):
    """The active model whose live reward fell below its baseline minus the margin."""

    version: str = Field(min_length=1)
    live_reward: float = Field(description="Its live reward (10%-trimmed mean over the window).")
    baseline_reward: float


class TrainingTrigger(_Model):
    reason: Literal["Created", "SpecChanged", "Manual", "Scheduled", "Trajectories", "Degraded"] = Field(description=(
        "Why this run exists: Created (the agent's first), SpecChanged (its training spec changed), Manual "
        "(a new rlops.dev/retrain value), Scheduled (spec.triggers.schedule), Trajectories "
        "(spec.triggers.trajectories.threshold new trajectories arrived), Degraded (the active model's live "
        "reward fell below its baseline minus spec.triggers.degradation.margin)."))
    agent_generation: int = Field(ge=1, description="metadata.generation of the agent it snapshots.")
    ordinal: int | None = Field(None, ge=1, description=(
        "Its place among the runs of the same agent generation that later triggers started (1, 2, ...); "
        "unset for the run the generation itself started."))
    nonce: str | None = Field(None, max_length=253, description="The rlops.dev/retrain value it was started for.")
    scheduled_time: datetime | None = Field(None, description="The scheduled time it was started for.")
    trajectories: TrajectoryWindow | None = Field(None, description="The new trajectories it was started for.",
                                                  json_schema_extra={NO_DEFAULT: True})
    degraded: DegradedModel | None = Field(None, description="The degraded active model it was started for.",
                                           json_schema_extra={NO_DEFAULT: True})


class TrainingRunSpec(_Model):
    """One immutable training attempt: a snapshot of its agent's spec at one generation."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", "spec is immutable")]},
    )

    agent_ref: ObjectRef
    trigger: TrainingTrigger
    environment: EnvironmentSpec
    algorithm: AlgorithmSpec
    training: TrainingTemplate
    evaluation: EvaluationSpec


#: A TrainingRun's phases. None (no status yet) is read as Pending.
RunPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Superseded"]
#: A TrainingRun's finished phases: nothing moves a run out of these.
RUN_TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed", "Superseded"})


class TrajectoriesUsed(_Status):
    """What the trainer made of the trajectories the run was started for."""

    stream: str | None = None
    subject: str | None = None
    read: int | None = Field(None, description="Messages read from the stream in the run's range.")
    used: int | None = Field(None, description=(
        "Trajectories trained on (0 when the environment takes no logged trajectories)."))
    skipped: int | None = Field(None, description="Messages that are not valid agent.rl.trajectory.v1 records.")
    first_sequence: int | None = Field(None, description="Stream sequence number of the first message read.")
    last_sequence: int | None = Field(None, description="Stream sequence number of the last message read.")


class MeasuredEvaluation(_Status):
    """The operator's own evaluation of a run's artifact: figures measured by an evaluation Job
    (``python -m rl_engine.evaluate``) from the platform's engine image, with the artifact mounted
    read only and a seed drawn by the operator after training ended. Returns are undiscounted
    episode returns in the environment's reward units."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = Field(description=(
        "Pending (its Job made), Running, Succeeded (the figures below are measured), Failed (reason and "
        "message say why; no Rollout is made)."))
    job_name: str | None = None
    image: str | None = Field(None, description="The evaluator's image reference.")
    image_id: str | None = Field(None, alias="imageID", description=(
        "The image the node ran, as its runtime reports it (a digest); empty where no image runs (the dev "
        "node agent runs pods as local processes)."))
    trusted: bool | None = Field(None, description=(
        "false: the environment needs the tenant's code (an entry point outside rl_engine), so it was "
        "evaluated in the tenant's own trainer image, and the figures come from code the tenant controls."))
    seed: int | None = Field(None, description="The seed of the evaluation episodes, drawn by the operator.")
    episodes: int | None = None
    fingerprint: str | None = Field(None, description="The fingerprint the evaluator computed from the bytes it read.")
    mean_return: float | None = None
    std_return: float | None = None
    min_return: float | None = None
    max_return: float | None = None
    random_mean_return: float | None = Field(None, description="The random policy's mean return on the same seeds.")
    baseline_mean_return: float | None = Field(None, description=(
        "The environment's own baseline policy's mean return on the same seeds, where it has one."))
    measured_at: datetime | None = None
    signature: str | None = Field(None, description=(
        "The operator's signature (HMAC-SHA256, its approval key) over the run and these figures: "
        "the Rollout carries it, and an approval's signature covers it."))
    reason: str | None = Field(None, description="Why the evaluation failed (FingerprintMismatch, ...).")
    message: str | None = None


class TrainingRunStatus(_Status):
    phase: RunPhase | None = None
    observed_generation: int | None = None
    job_name: str | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description=("Final metrics as the trainer reported them in its termination message (meanReturn, ...): the "
                     "trainer runs the tenant's code, so rollouts and approvals use status.evaluation instead."),
        json_schema_extra=FREE_FORM,
    )
    artifact_uri: str | None = Field(None, alias="artifactURI")
    fingerprint: str | None = None
    failure_reason: str | None = None
    failure_message: str | None = None
    trajectories: TrajectoriesUsed | None = Field(None, description=(
        "The trajectories the trainer read and trained on (runs of the trajectory trigger)."))
    evaluation: MeasuredEvaluation | None = Field(None, description=(
        "The operator's own evaluation of the artifact, once the trainer succeeded: what the Rollout, the "
        "approver and auto-approval use."))
    conditions: list[Condition] = Field(default_factory=list)


class TrainingRun(_Status):
    KIND: ClassVar[str] = "TrainingRun"
    PLURAL: ClassVar[str] = "trainingruns"
    spec: TrainingRunSpec
    status: TrainingRunStatus = Field(default_factory=TrainingRunStatus)


# ----------------------------------------------------------------------------- Rollout


class EvaluationSummary(_Model):
    """The trained policy's evaluation, measured by the operator's evaluation Job (its run's
    ``status.evaluation``), signed by the operator. A Rollout made before measured evaluations
    carries only the trainer's reported ``meanReturn``, ``stdReturn`` and ``episodes``."""

    mean_return: float | None = None
    std_return: float | None = None
    episodes: int | None = None
    random_mean_return: float | None = None
    baseline_mean_return: float | None = None
    seed: int | None = Field(None, description="The seed of the evaluation episodes, drawn by the operator.")
    trusted: bool | None = Field(None, description=(
        "false: evaluated in the tenant's own image (its environment needs the tenant's code)."))
    evaluator_image: str | None = None
    evaluator_image_id: str | None = Field(None, alias="evaluatorImageID", description=(
        "The evaluator image as the node ran it (a digest)."))
    reported_mean_return: float | None = Field(None, description="The mean return the trainer itself reported.")
    signature: str | None = Field(None, description="The operator's signature over the run and these figures.")


class RolloutSpec(_Model):
    """The promotion of one artifact: written once by the operator from a Succeeded TrainingRun."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", "spec is immutable")]},
    )

    agent_ref: ObjectRef
    training_run_ref: ObjectRef
    version: str = Field(min_length=1, max_length=63, description="Serving version name (policy-<version>).")
    artifact_uri: str = Field(alias="artifactURI", min_length=1)
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    evaluation: EvaluationSummary = Field(default_factory=EvaluationSummary)


class Approval(_Status):
    """Who approved which artifact, when, and under which policy (the approval registry)."""

    # Follows seed 000's operator approval registry (this comment stays out of the CRD).

    approved_by: str
    approved_at: datetime
    fingerprint: str
    policy: Literal["manual", "auto"]
    notes: str | None = None
    via: str | None = Field(
        None, description=(
            "Set when the approval was made with impersonation (kubectl --as): 'impersonated by <user>', "
            "the user who really made it, from the API server's audit log (needs the API server's audit "
            "webhook pointed at the operator) or from the admission request."))


class AnalysisRun(_Status):
    """The latest analysis verdict for the current step."""

    phase: Literal["Successful", "Failed", "Inconclusive", "Error"]
    message: str = ""
    step_index: int | None = None
    measured_at: datetime | None = None
    consecutive_errors: int = Field(
        0, description="Measurements in a row at this step that could not be taken (phase Error), this one included.")
    metrics: dict[str, Any] = Field(default_factory=dict, json_schema_extra=FREE_FORM)


class ShadowStatus(_Status):
    """Observe mode: the candidate shadows the stable version (counts since the shadow started)."""

    started_at: datetime | None = None
    decisions: int = Field(0, description="Answers of the stable version the shadow was also asked.")
    agreements: int = Field(0, description="Of those, the ones where it chose the same action.")
    agreement_rate: float | None = None
    override_feedback: int = Field(0, description="Feedbacks on answers where the shadow disagreed.")
    override_correct: int = Field(0, description="Of those, the ones that say the shadow was right.")
    override_accuracy: float | None = None
    measured_at: datetime | None = None
    graduated_at: datetime | None = None
    ended: str | None = Field(None, description="Why the shadow ended without graduating (mode set to active).")


#: A Rollout's phases. None (no status yet) is read as Pending.
RolloutPhase = Literal["Pending", "Shadowing", "AwaitingApproval", "Approved", "Queued", "Progressing", "Paused",
                       "Promoting", "Promoted", "RolledBack", "Rejected", "Ignored", "Superseded"]
#: Finished for good: nothing moves a Rollout out of these.
ROLLOUT_TERMINAL: frozenset[str] = frozenset({"Promoted", "RolledBack", "Rejected", "Ignored", "Superseded"})
#: Its candidate is deployed beside the stable version (a shadow, or a canary with traffic): the
#: agent's other Rollouts queue behind it.
ROLLOUT_ACTIVE: frozenset[str] = frozenset({"Shadowing", "Progressing", "Paused", "Promoting"})


class RolloutStatus(_Status):
    phase: RolloutPhase | None = Field(None, description=(
        "Pending, Shadowing (observe mode: the candidate is compared with the stable version, no traffic), "
        "AwaitingApproval, Approved (serving disabled, or waiting to start), Queued (behind "
        "another Rollout of the agent), Progressing, Paused, Promoting; finished: Promoted, RolledBack, "
        "Rejected, Ignored (not made by the operator from a TrainingRun), Superseded (a newer run's Rollout "
        "appeared before this one was approved)."))
    message: str | None = None
    observed_generation: int | None = None
    stable_version: str | None = None
    canary_version: str | None = None
    current_step_index: int | None = None
    step_started_at: datetime | None = None
    canary_weight: int | None = None
    weight_before_freeze: int | None = Field(None, description=(
        "The canary's weight when the kill switch froze the Rollout (restored when it is lifted)."))
    approval: Approval | None = None
    analysis: AnalysisRun | None = None
    shadow: ShadowStatus | None = None
    abort_reason: str | None = None
    aborted_at: datetime | None = None
    completed_at: datetime | None = None
    conditions: list[Condition] = Field(default_factory=list)


class Rollout(_Status):
    KIND: ClassVar[str] = "Rollout"
    PLURAL: ClassVar[str] = "rollouts"
    spec: RolloutSpec
    status: RolloutStatus = Field(default_factory=RolloutStatus)


def _phase(obj: Mapping[str, Any] | None, phases: Any, kind: str) -> Any:
    phase = ((obj or {}).get("status") or {}).get("phase")
    if phase is not None and phase not in get_args(phases):
        name = ((obj or {}).get("metadata") or {}).get("name")
        raise ValueError(f"{kind} {name}: status.phase {phase!r} is none of {', '.join(get_args(phases))}")
    return phase


def agent_phase(agent: Mapping[str, Any] | None) -> AgentPhase | None:
    """An RLAgent's ``status.phase`` (a dict as the API returns it), checked against :data:`AgentPhase`.

    Raises:
        ValueError: a phase that is not one of :data:`AgentPhase`."""
    return _phase(agent, AgentPhase, "RLAgent")


def run_phase(run: Mapping[str, Any] | None) -> RunPhase | None:
    """A TrainingRun's ``status.phase``, checked against :data:`RunPhase` (ValueError otherwise)."""
    return _phase(run, RunPhase, "TrainingRun")


def rollout_phase(rollout: Mapping[str, Any] | None) -> RolloutPhase | None:
    """A Rollout's ``status.phase``, checked against :data:`RolloutPhase` (ValueError otherwise)."""
    return _phase(rollout, RolloutPhase, "Rollout")
