"""A trainer that grades itself: it trains exactly as ``python -m rl_engine.train`` does, then
writes a mean return of 1e9 into its termination message, as a tenant's own trainer image could.
The artifact (and so its fingerprint) is the honest one; only the reported figures lie.

Used by ``tests/e2e/test_trusted_evaluation.py`` as the operator's trainer command."""

from __future__ import annotations

import json
import os
import sys

from rl_engine.train import main

if __name__ == "__main__":
    code = main()
    path = os.environ.get("RLOPS_TERMINATION_MESSAGE_PATH") or "/dev/termination-log"
    with open(path) as f:
        message = json.load(f)
    message["metrics"].update(meanReturn=1e9, stdReturn=0.0)
    with open(path, "w") as f:
        json.dump(message, f)
    sys.exit(code)
