"""A deployed agent against a curious coordinator: its noise cannot be predicted, its own
privacy settings win, nothing un-noised about its data leaves under DP, failures go back
as short codes, its ledger cannot be lost by accident, and a restarted agent that lost
what it was sent asks for it again instead of training against the wrong tensors."""

import json

import pytest
import torch
from flwr.app import Context, RecordDict
from replies import FakeReply

from fedlora.client.handler import train
from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.flower.bridge import FlowerStrategy
from fedlora.flower.messages import RECORD, RESYNC, RunFacts
from fedlora.io import wire
from fedlora.io.agent_state import AgentPrivacy, Ledger, data_digest, lock_state_dir
from fedlora.ml.task import initial_adapter_state, lora_spec
from fedlora.strategies import make_strategy

LABELS = ("business", "entertainment", "politics", "sports", "tech")
SMALL = dict(local_steps=1, batch_size=4, max_length=16, rounds=3)


pytestmark = pytest.mark.usefixtures("inside_a_flower_run")  # data_file: conftest


def coordinator(strategy: str = "fedavg", labels: tuple[str, ...] = LABELS, **overrides) -> FlowerStrategy:
    cfg = RunConfig(strategy=strategy, **{**SMALL, **overrides})
    adapter = make_strategy(strategy, lora_spec(cfg))
    state = adapter.setup(initial_adapter_state(cfg.model, len(labels), adapter.spec, cfg.seed, cfg.task, cfg.pooling))
    return FlowerStrategy(adapter, state, json.dumps(cfg.to_dict()), run_facts=RunFacts(labels))


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def agent(data_file, state_dir, own: AgentPrivacy = AgentPrivacy(), node_id: int = 7) -> Context:
    node = {
        "data-path": str(data_file),
        "state-dir": str(state_dir),
        "device": "cpu",
        "num-examples": 24,
        "data-digest": data_digest(data_file) if data_file.exists() else "0" * 64,
    }
    node.update(dict(pair.split("=", 1) for pair in own.node_config()))
    node = {k: (float(v) if k.startswith("dp-") else v) for k, v in node.items()}
    return Context(run_id=1, node_id=node_id, node_config=node, state=RecordDict(), run_config={})


def reply_of(message) -> tuple[dict, dict, object]:
    record = message.content[RECORD]
    metrics = dict(message.content.metric_records.get("metrics", {}))
    return dict(record), metrics, wire.decode(record["payload"]) if "payload" in record else None


def test_deployed_noise_is_unpredictable_and_simulated_noise_repeats(data_file, tmp_path):
    bridge = coordinator(dp_epsilon=8.0)
    msg = bridge.configure_train(1, None, None, Grid([7]))[0]
    updates = [reply_of(train(msg, agent(data_file, tmp_path / f"agent-{i}")))[2].tensors for i in range(2)]
    assert any(not torch.equal(updates[0][n], updates[1][n]) for n in updates[0])  # same message, other noise
    simulated = [
        reply_of(
            train(msg, Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}))
        )[2].tensors
        for _ in range(2)
    ]
    assert all(torch.equal(simulated[0][n], simulated[1][n]) for n in simulated[0])  # one party: seeded


def test_the_agents_own_delta_and_step_cap_win_before_any_data_is_read(tmp_path):
    unread = tmp_path / "not-there.jsonl"  # reading it would fail: the refusal must come first
    for overrides, own, code in (
        ({"dp_epsilon": 1.0, "dp_delta": 0.5}, AgentPrivacy(), "dp-delta-refused"),
        ({"dp_epsilon": 1.0}, AgentPrivacy(max_steps=2), "dp-steps-refused"),
        ({"dp_delta": 0.5}, AgentPrivacy(epsilon=3.0), "dp-delta-refused"),  # DP the agent asked for itself
    ):
        msg = coordinator(**overrides).configure_train(1, None, None, Grid([7]))[0]
        record, _, payload = reply_of(train(msg, agent(unread, tmp_path / "s", own)))
        assert record == {"declined": code} and payload is None


def test_under_dp_a_reply_carries_the_update_and_dp_statistics_only(data_file, tmp_path):
    msg = coordinator().configure_train(1, None, None, Grid([7]))[0]  # the coordinator did not even ask for DP
    record, metrics, payload = reply_of(train(msg, agent(data_file, tmp_path / "s", AgentPrivacy(epsilon=4.0))))
    assert set(metrics) == {"epsilon"} and payload.metrics == {}
    assert payload.dp["delta"] == pytest.approx(1e-5) and payload.dp["epsilon"] <= 4.0
    assert payload.num_examples == round(4 / payload.dp["sample_rate"])  # no finer than the public sample rate
    ledger = Ledger(tmp_path / "s", data_digest(data_file)).read()
    assert sum(h[2] for h in ledger) == 1  # the step is in the agent's own ledger


def test_failures_go_back_as_short_codes_without_the_datas_words(data_file, tmp_path):
    msg = coordinator(labels=("weather", "tides")).configure_train(1, None, None, Grid([7]))[0]
    record, _, _ = reply_of(train(msg, agent(data_file, tmp_path / "s")))
    assert record == {"declined": "labels-mismatch"}
    broken = coordinator().configure_train(1, None, None, Grid([7]))[0]
    broken.content[RECORD]["payload"] = b"\x00not a payload"
    record, _, _ = reply_of(train(broken, agent(data_file, tmp_path / "s")))
    assert record == {"declined": "agent-error"}


def test_a_lost_ledger_is_an_error_not_a_fresh_budget(data_file, tmp_path):
    msg = coordinator(dp_epsilon=8.0).configure_train(1, None, None, Grid([7]))[0]
    train(msg, agent(data_file, tmp_path / "s"))
    ledger = Ledger(tmp_path / "s", data_digest(data_file))
    ledger.path.unlink()
    record, _, _ = reply_of(train(msg, agent(data_file, tmp_path / "s")))
    assert record == {"declined": "ledger-lost"}
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text() + "\n")  # another file: its own, fresh ledger
    assert Ledger(tmp_path / "s", data_digest(other)).read() == []
    assert ledger.reset() and ledger.read() == []


def test_one_agent_per_state_folder(tmp_path):
    held = lock_state_dir(tmp_path / "s")
    with pytest.raises(UserError, match="another agent"):
        lock_state_dir(tmp_path / "s")
    held.close()
    lock_state_dir(tmp_path / "s").close()


def test_a_restarted_agent_keeps_or_is_sent_again_what_it_was_sent_once(data_file, tmp_path):
    """FFA-LoRA's frozen A goes to a client once. A restarted agent reads it back from its
    disk; one that lost its disk declines with 'resync', and the coordinator resends it."""
    bridge = coordinator("ffa")
    first = bridge.configure_train(1, None, None, Grid([7]))[0]
    bridge.aggregate_train(1, [FakeReply(7, reply_of(train(first, agent(data_file, tmp_path / "s")))[0]["payload"])])
    assert bridge.synced == {7: 0}

    second = bridge.configure_train(2, None, None, Grid([7]))[0]  # no A in it: node 7 holds it
    restarted = agent(data_file, tmp_path / "s")  # a new process: its Flower node state is empty
    record, _, payload = reply_of(train(second, restarted))
    assert payload is not None and payload.round == 2

    wiped = agent(data_file, tmp_path / "wiped")
    record, _, _ = reply_of(train(second, wiped))
    assert record["declined"] == RESYNC
    bridge.aggregate_train(2, [FakeReply(7, declined=record["declined"])])
    assert 7 not in bridge.synced
    third = bridge.configure_train(3, None, None, Grid([7]))[0]  # everything again, A included
    record, _, payload = reply_of(train(third, wiped))
    assert payload is not None and payload.round == 3
