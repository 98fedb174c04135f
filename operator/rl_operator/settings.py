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

    trainer_uid: int = 1000
    """Non-root user id the training container runs as (``securityContext.runAsUser``)."""

    resync_seconds: float = 15.0
    """Period (seconds) of the safety-net resync of unfinished TrainingRuns, on top of watch events.
    Env: ``RLOPS_RESYNC_SECONDS``."""

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
            resync_seconds=float(env.get("RLOPS_RESYNC_SECONDS", cls.resync_seconds)),
            extra_env={k[len(prefix):]: v for k, v in env.items() if k.startswith(prefix)},
        )
