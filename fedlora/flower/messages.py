"""What the ServerApp and the ClientApp agree on: the record's name and the keys in it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

RECORD = "fedlora"
PHASE_TRAIN = "train"
PHASE_INIT = "init"
HELD_DIGEST = "held_digest"  # what the client should hold after this message (strategies.base.held_digest)
RESYNC = "resync"  # a client's decline: it lacks what it was sent before (a restarted agent)
DECLINED = "declined"  # the record key of a client's short status instead of an update
AGENT_ERROR = "agent-error"  # a deployed agent's decline when something failed on its side
AGENT_BUSY = "agent-busy"  # a deployed agent's decline: its trainer was serving another request

FACTS = "run_facts"  # the record key of a RunFacts, as JSON


@dataclass(frozen=True)
class RunFacts:
    """What a run learns as it starts and its clients need, kept apart from the user's settings."""

    labels: tuple[str, ...] = ()  # the federation's label names, in index order
    client_state_dir: str | None = None  # simulation only: where simulated clients keep their accountants

    def to_json(self) -> str:
        return json.dumps({"labels": list(self.labels), "client_state_dir": self.client_state_dir})

    @classmethod
    def from_json(cls, text: str) -> RunFacts:
        """Untrusted on a deployed agent: a malformed value is a ValueError."""
        values = json.loads(text)
        labels = values.get("labels", []) if isinstance(values, dict) else None
        state_dir = values.get("client_state_dir") if isinstance(values, dict) else None
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError("run facts: labels must be a list of strings")
        if state_dir is not None and not isinstance(state_dir, str):
            raise ValueError("run facts: client_state_dir must be a string")
        return cls(tuple(labels), state_dir)


def decline(msg: Message, reason: str, epsilon: float | None) -> Message:
    """A clear status instead of an update."""
    content = RecordDict({RECORD: ConfigRecord({DECLINED: reason})})
    if epsilon is not None:
        content["metrics"] = MetricRecord({"epsilon": epsilon})
    return Message(content, reply_to=msg)
