"""Stand-ins for Flower reply Messages, for driving the coordinator's bridge without a run."""

from types import SimpleNamespace

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlora.flower.messages import RECORD


class FakeReply:
    """Duck-typed stand-in for a Flower reply Message (real ones need a live run)."""

    def __init__(
        self,
        node: int,
        payload=None,
        error: str | None = None,
        metrics: dict | None = None,
        declined: str | None = None,
    ):
        self.metadata = SimpleNamespace(src_node_id=node)
        self.error = SimpleNamespace(reason=error)
        content = RecordDict()
        if declined is not None:
            content[RECORD] = ConfigRecord({"declined": declined})
        if payload is not None:
            content[RECORD] = ConfigRecord({"payload": payload})
        if payload is not None or declined is not None:
            content["metrics"] = MetricRecord(metrics if metrics is not None else {"loss": 1.0, "train-seconds": 0.5})
        self.content = content

    def has_error(self) -> bool:
        return self.error.reason is not None
