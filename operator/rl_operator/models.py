"""The rlops API (group ``rlops.dev``, version ``v1alpha1``): one module, one source of truth.

The pydantic models below define the three custom resources. ``rl_operator.crdgen`` turns
them into the structural CRD schemas in ``crds/`` (``make crds``), so what the API server
validates at admission and what the operator parses are the same definition.

Field names follow the Kubernetes API conventions (camelCase on the wire, ``spec`` is the
user's, ``status`` is the operator's, ``conditions[]`` and ``observedGeneration``) and the RL
field's own terms (environment, episode, return, timesteps).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "rlops.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Label put on every child, naming the RLAgent it belongs to.
AGENT_LABEL = f"{GROUP}/agent"
#: Label put on a training Job and its pods, naming the TrainingRun.
RUN_LABEL = f"{GROUP}/training-run"

DEFAULT_TRAINER_IMAGE = "ghcr.io/rlops/trainer:0.1.0"

#: Stored as free-form JSON in the CRD schema (``x-kubernetes-preserve-unknown-fields``).
FREE_FORM = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


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

    id: str = Field(
        min_length=1,
        max_length=253,
        description="Gymnasium registry id (e.g. CartPole-v1) or a 'module:Class' entry point.",
    )
    num_envs: int = Field(8, ge=1, le=1024, description="Environments stepped in parallel (vector env).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments passed to the environment's constructor.",
        json_schema_extra=FREE_FORM,
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
        json_schema_extra=FREE_FORM,
    )


class ResourceSpec(_Model):
    """Compute for one training pod."""

    gpu: int = Field(1, ge=0, le=64, description="nvidia.com/gpu count (limit) for the training pod.")
    cpu: str = Field("1", min_length=1, description="CPU request and limit (Kubernetes quantity).")
    memory: str = Field("2Gi", min_length=1, description="Memory request and limit (Kubernetes quantity).")


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
    image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1, description="Trainer container image.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    backoff_limit: int = Field(0, ge=0, le=10, description="Job backoffLimit: retries of a failed pod.")
    active_deadline_seconds: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Job activeDeadlineSeconds (seconds)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Added to the GPU node selector of the training pod."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Added to the nvidia.com/gpu toleration of the training pod.",
        json_schema_extra={"items": FREE_FORM},
    )


class EvaluationSpec(_Model):
    """How the trained policy is evaluated before it may be rolled out."""

    episodes: int = Field(20, ge=1, le=10_000, description="Deterministic evaluation episodes.")
    min_mean_return: float | None = Field(
        None, description="Minimum mean evaluation return for a run to be eligible for rollout."
    )


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
    mode: Literal["active", "observe"] = Field(
        "active", description="active: train and roll out; observe: record decisions only."
    )


class RLAgentStatus(_Status):
    phase: str | None = None
    observed_generation: int | None = None
    latest_run: str | None = None
    latest_mean_return: float | None = None
    latest_fingerprint: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class RLAgent(_Status):
    KIND: ClassVar[str] = "RLAgent"
    PLURAL: ClassVar[str] = "rlagents"
    spec: RLAgentSpec
    status: RLAgentStatus = Field(default_factory=RLAgentStatus)


# ----------------------------------------------------------------------------- TrainingRun


class TrainingTrigger(_Model):
    reason: str = Field(description="Why this run exists: Created, SpecChanged, ...")
    agent_generation: int = Field(ge=1, description="metadata.generation of the agent it snapshots.")


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


class TrainingRunStatus(_Status):
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = None
    observed_generation: int | None = None
    job_name: str | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="Final metrics from the trainer's termination message (meanReturn, ...).",
        json_schema_extra=FREE_FORM,
    )
    artifact_uri: str | None = Field(None, alias="artifactURI")
    fingerprint: str | None = None
    failure_reason: str | None = None
    failure_message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class TrainingRun(_Status):
    KIND: ClassVar[str] = "TrainingRun"
    PLURAL: ClassVar[str] = "trainingruns"
    spec: TrainingRunSpec
    status: TrainingRunStatus = Field(default_factory=TrainingRunStatus)


# ----------------------------------------------------------------------------- Rollout (sketch)


class CanaryStep(_Model):
    """One canary step; exactly one of its fields is set (like Argo Rollouts' CanaryStep)."""

    model_config = ConfigDict(
        **_WIRE,
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.setWeight) != has(self.pause)",
                    "exactly one of setWeight or pause must be set",
                )
            ]
        },
    )

    set_weight: int | None = Field(None, ge=0, le=100, description="Canary traffic weight (percent).")
    pause: dict[str, Any] | None = Field(
        None, description="Pause; {duration: seconds} or {} to wait for promotion.", json_schema_extra=FREE_FORM
    )


class RolloutSpec(_Model):
    """The promotion of one artifact (sketch; the canary controller is a later issue)."""

    agent_ref: ObjectRef
    training_run_ref: ObjectRef
    artifact_uri: str = Field(alias="artifactURI", min_length=1)
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    steps: list[CanaryStep] = Field(default_factory=list, max_length=32)


class RolloutStatus(_Status):
    phase: str | None = None
    observed_generation: int | None = None
    current_step_index: int | None = None
    canary_weight: int | None = None
    approval: dict[str, Any] | None = Field(None, json_schema_extra=FREE_FORM)
    conditions: list[Condition] = Field(default_factory=list)


class Rollout(_Status):
    KIND: ClassVar[str] = "Rollout"
    PLURAL: ClassVar[str] = "rollouts"
    spec: RolloutSpec
    status: RolloutStatus = Field(default_factory=RolloutStatus)
