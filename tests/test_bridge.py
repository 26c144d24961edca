"""The coordinator's handling of untrusted replies: rejected updates are counted, logged
and left out; the global state never sees them; the round goes on with the valid ones."""

import logging
from types import SimpleNamespace

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlora import wire
from fedlora.adapters import LoRASpec
from fedlora.strategies import make_strategy
from fedlora.strategies.flower_bridge import RECORD, FlowerStrategy

SPEC = LoRASpec(rank=2, alpha=4.0, target_modules=("q",))
GLOBAL = {
    "m.q.lora_A.weight": torch.ones(2, 3),
    "m.q.lora_B.weight": torch.zeros(4, 2),
    "classifier.weight": torch.zeros(2, 4),
}


class FakeReply:
    """Duck-typed stand-in for a Flower reply Message (real ones need a live run)."""

    def __init__(self, node: int, payload=None, error: str | None = None, metrics: dict | None = None):
        self.metadata = SimpleNamespace(src_node_id=node)
        self.error = SimpleNamespace(reason=error)
        content = RecordDict()
        if payload is not None:
            content[RECORD] = ConfigRecord({"payload": payload})
            content["metrics"] = MetricRecord(metrics if metrics is not None else {"loss": 1.0, "train-seconds": 0.5})
        self.content = content

    def has_error(self) -> bool:
        return self.error.reason is not None


def update(value: float, **overrides) -> bytes:
    tensors = {n: torch.full_like(t, value) for n, t in GLOBAL.items()}
    tensors.update(overrides.pop("tensors", {}))
    return wire.encode_update(tensors, **{"strategy": "fedavg", "round_num": 1, "num_examples": 10, **overrides})


def bridge(**kw) -> FlowerStrategy:
    return FlowerStrategy(make_strategy("fedavg", SPEC), dict(GLOBAL), "{}", **kw)


def test_invalid_updates_are_rejected_logged_and_left_out(caplog):
    b = bridge()
    replies = [
        FakeReply(1, update(1.0)),
        FakeReply(2, b"\x00garbage"),
        FakeReply(3, update(5.0, tensors={"m.q.lora_A.weight": torch.ones(3, 3)})),
        FakeReply(4, update(5.0, round_num=7)),
        FakeReply(5, update(float("nan"))),
        FakeReply(6, None),
        FakeReply(7, error="ClientAppException: out of memory"),
    ]
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        b.aggregate_train(1, replies)
    assert b.stats.clients == 1 and b.stats.rejected == 5 and b.stats.failed == 1
    for name in GLOBAL:  # only client 1's update made it in
        torch.testing.assert_close(b.global_state[name], torch.full_like(GLOBAL[name], 1.0))
    logged = caplog.text
    for node in (2, 3, 4, 5, 6):
        assert f"client {node}" in logged
    assert "shape" in logged and "round 7" in logged and "non-finite" in logged


def test_global_state_untouched_when_every_update_is_rejected():
    b = bridge()
    before = {n: t.clone() for n, t in b.global_state.items()}
    b.aggregate_train(1, [FakeReply(1, b"nope"), FakeReply(2, update(1.0, strategy="ffa"))])
    assert b.stats.clients == 0 and b.stats.rejected == 2
    for n in before:
        assert torch.equal(b.global_state[n], before[n])


def test_oversized_payload_is_rejected_unread():
    b = bridge(max_update_bytes=64)
    b.aggregate_train(1, [FakeReply(1, update(1.0))])
    assert b.stats.rejected == 1 and "exceeds" in b.stats.reasons[0]


def test_robust_aggregation_clips_a_boosted_update():
    b = bridge(robust_multiple=3.0, robust_mode="clip")
    replies = [FakeReply(1, update(1.0)), FakeReply(2, update(1.1)), FakeReply(3, update(100.0))]
    b.aggregate_train(1, replies)
    assert b.stats.clipped == 1 and b.stats.clients == 3
    assert float(b.global_state["classifier.weight"].max()) < 5.0
    b = bridge(robust_multiple=3.0, robust_mode="reject")
    b.aggregate_train(1, replies)
    assert b.stats.rejected == 1 and b.stats.clients == 2


def test_malformed_client_metrics_are_ignored_not_fatal():
    b = bridge()
    replies = [
        FakeReply(1, update(1.0), metrics={"loss": [1.0, 2.0], "epsilon": [3.0], "train-seconds": float("nan")}),
        FakeReply(2, update(1.0), metrics={"loss": float("inf"), "epsilon": float("nan")}),
        FakeReply(3, update(1.0), metrics={"loss": 2.0, "epsilon": 1.5, "train-seconds": 4.0}),
    ]
    b.aggregate_train(1, replies)
    assert b.stats.clients == 3
    assert b.stats.train_loss == 2.0 and b.stats.train_seconds == 4.0
    assert b.worst_epsilon == 1.5


def test_a_non_finite_aggregate_is_discarded_and_the_state_kept():
    # an aggregate beyond what the fp16 wire dtype represents: it would round to inf
    b = bridge(wire_dtype="fp16")
    before = {n: t.clone() for n, t in b.global_state.items()}
    aggregate = b.strategy.aggregate

    def overflowing(global_state, updates, server_round):
        result = aggregate(global_state, updates, server_round)
        result.state["classifier.weight"] = result.state["classifier.weight"] * 1e6  # beyond fp16
        return result

    b.strategy.aggregate = overflowing
    b.aggregate_train(1, [FakeReply(1, update(1.0, wire_dtype="fp16"))])
    assert b.stats.clients == 0 and "not finite" in b.stats.reasons[0]
    for n in before:
        assert torch.equal(b.global_state[n], before[n])
