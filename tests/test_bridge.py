"""The coordinator's handling of untrusted replies: rejected updates are counted, logged
and left out; the global state never sees them; the round goes on with the valid ones."""

import logging
from types import SimpleNamespace

import torch
from replies import FakeReply

from fedlora.flower.bridge import FlowerStrategy
from fedlora.flower.messages import RECORD
from fedlora.io import wire
from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import make_strategy

SPEC = LoRASpec(rank=2, alpha=4.0, target_modules=("q",))
GLOBAL = {
    "m.q.lora_A.weight": torch.ones(2, 3),
    "m.q.lora_B.weight": torch.zeros(4, 2),
    "classifier.weight": torch.zeros(2, 4),
}


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


def test_fedsb_one_off_tensors_travel_in_the_init_dtype_and_aggregation_stays_exact(monkeypatch):
    """--init-dtype bf16 on an fp32 wire: the gradient sketches and the frozen A and B
    cross in bf16, R and the head in fp32; the server keeps the A and B the clients
    receive, so the weighted mean of R is still the exact global update."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.io.schema import update_pb2 as pb

    for field in ("_run_id", "_node_id", "_task_id"):  # Flower builds Messages inside a run
        monkeypatch.setattr(TaskIdentity, field, 1)
    fedsb = make_strategy("fedsb", SPEC)
    b = FlowerStrategy(fedsb, fedsb.setup(dict(GLOBAL)), "{}", init_dtype="bf16")
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2])
    assert all(m.content[RECORD]["init_dtype"] == "bf16" for m in b.configure_init(grid))
    gen = torch.Generator().manual_seed(0)
    sketches = [fedsb.init_reply({"m.q": torch.randn(4, 3, generator=gen)}) for _ in range(2)]
    blobs = [
        wire.encode(s, kind="init", strategy="fedsb", num_examples=n, wire_dtype="bf16")
        for s, n in zip(sketches, (10, 30))
    ]
    assert b.aggregate_init([FakeReply(1, blobs[0]), FakeReply(2, blobs[1])])

    a, r = b.global_state["m.q.lora_A.weight"], b.global_state["m.q.lora_R.weight"]
    assert torch.equal(a, a.bfloat16().float()) and not torch.equal(r, r.bfloat16().float())
    payload = b.configure_train(1, None, None, grid)[0].content[RECORD]["payload"]
    dtypes = {t.name: t.dtype for t in pb.Payload.FromString(payload).tensors}
    assert dtypes == {
        "m.q.lora_A.weight": pb.BFLOAT16,
        "m.q.lora_B.weight": pb.BFLOAT16,
        "m.q.lora_R.weight": pb.FLOAT32,
        "classifier.weight": pb.FLOAT32,
    }
    received = wire.decode(payload).tensors
    for name in ("m.q.lora_A.weight", "m.q.lora_B.weight"):
        assert torch.equal(received[name], b.global_state[name])

    def client_update(value: float, n: int) -> bytes:
        tensors = {"m.q.lora_R.weight": r + value, "classifier.weight": torch.full((2, 4), value)}
        return wire.encode_update(tensors, strategy="fedsb", round_num=1, num_examples=n)

    b.aggregate_train(1, [FakeReply(1, client_update(0.5, 10)), FakeReply(2, client_update(-0.25, 30))])
    assert b.stats.clients == 2 and b.stats.aggregation_error <= 1e-5
    torch.testing.assert_close(b.global_state["m.q.lora_R.weight"], r + (0.5 * 10 - 0.25 * 30) / 40)


def test_one_clients_bf16_initialisation_is_within_its_own_sketchs_bound(monkeypatch):
    """A single client's initialisation is its own sketch: rounded to bf16 on the wire its
    effect can pass the sketch's own by more than fp32 rounding, and must not be discarded."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.flower.bridge import INIT_BOUND_SLACK

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    fedsb = make_strategy("fedsb", SPEC)
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(12):
        b = FlowerStrategy(fedsb, fedsb.setup(dict(GLOBAL)), "{}", init_dtype="bf16")
        b.configure_init(SimpleNamespace(get_node_ids=lambda: [1]))
        sketch = fedsb.init_reply({"m.q": torch.randn(4, 3, generator=gen)})
        blob = wire.encode(sketch, kind="init", strategy="fedsb", num_examples=10, wire_dtype="bf16")
        received = wire.decode(blob).tensors
        assert b.aggregate_init([FakeReply(1, blob)]), b.init_stats.reasons
        ratios.append(fedsb.effect_norm(b.global_state, b.global_state) / fedsb.init_effect_norm(received))
    assert max(ratios) < 1 + INIT_BOUND_SLACK["bf16"]
