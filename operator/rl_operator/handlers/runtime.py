"""The operator process's state, in one object: :data:`RUNTIME`.

Everything that changes while the operator runs lives here and nowhere else in the handlers:
the signing key (loaded at start-up), the approval webhook's server and certificate, the
receivers' bearer tokens, the kill switch, whether this replica works (peering), the live
rewards of the agents' active models and the NATS connection's lock. The settings are read from
the environment once, when this module is first imported.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from rl_operator import triggers
from rl_operator.admission import AdmissionServer
from rl_operator.settings import OperatorSettings


@dataclass
class Runtime:
    settings: OperatorSettings
    #: The operator's signing key (``settings.approval_key_secret``), loaded at start-up (None before).
    key: bytes | None = None
    #: The global kill switch's reason while it is engaged, else None (``startup.watch_kill_switch``).
    kill_switch: str | None = None
    #: Whether this replica works (peering), as the resync loop last saw.
    working: bool = False
    #: The approval webhook's server while it runs.
    admission: AdmissionServer | None = None
    #: The webhook certificate this process serves: ``names``, ``data`` (from the shared Secret).
    webhook_cert: dict[str, Any] = field(default_factory=dict)
    #: The receivers' bearer tokens, re-read from their Secrets (None: not read yet; the receiver answers 503).
    tokens: dict[str, str | None] = field(default_factory=lambda: {"alert": None, "audit": None})
    #: The last live reward of each agent's active model, by agent uid (the degradation trigger).
    live: dict[str, triggers.LiveReward] = field(default_factory=dict)
    live_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Guards connecting to NATS (made on kopf's event loop at first use).
    nats_lock: asyncio.Lock | None = None


RUNTIME = Runtime(settings=OperatorSettings.from_env())
