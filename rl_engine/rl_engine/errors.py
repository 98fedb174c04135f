"""Trainer failure types, their termination-message reasons and exit codes (torch-free).

Every failure the trainer reports is a :class:`TrainerFailure`; the entrypoint turns it
into the termination message ``{"phase": "Failed", "reason": ..., "message": ...}`` and
exits with :attr:`TrainerFailure.exit_code`.

========================  ===========  ===================================================
class                     exit code    reason
========================  ===========  ===================================================
:class:`TrainerFailure`   1            ``TrainerError`` (anything unexpected)
:class:`InvalidConfig`    2            ``InvalidConfig`` (run config, env id, CLI input)
:class:`NonFiniteLoss`    3            ``NonFiniteLoss`` (NaN/inf loss, gradient, weights)
========================  ===========  ===================================================
"""

from __future__ import annotations


class TrainerFailure(Exception):
    """A failure with a CamelCase ``reason`` and a process exit code.

    Args:
        message: human-readable text; names the config field or training step at fault.
    """

    reason: str = "TrainerError"
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfig(TrainerFailure):
    """The run config (or the environment it names) is invalid. Exit code 2.

    The message starts with the dotted camelCase path of the offending field, e.g.
    ``algorithm.hyperparameters.learningRat: unknown hyperparameter``.
    """

    reason = "InvalidConfig"
    exit_code = 2


class NonFiniteLoss(TrainerFailure):
    """A PPO update produced a NaN/inf loss, gradient norm or parameter. Exit code 3.

    The message names the update (iteration), epoch, minibatch and global env step, and
    the last finite loss values seen before it.
    """

    reason = "NonFiniteLoss"
    exit_code = 3
