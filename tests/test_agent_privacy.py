"""A deployed agent against a curious coordinator: its noise cannot be predicted, its own
task and privacy settings win, nothing un-noised about its data leaves under DP (no
accept/decline depends on its content), failures go back as short codes, its ledger
cannot be lost or side-stepped by accident, what it holds is bounded, and a restarted
agent that lost what it was sent asks for it again instead of training against the
wrong tensors."""

import json
from dataclasses import replace

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from replies import FakeReply

from fedlora.client.handler import train
from fedlora.config import RunConfig
from fedlora.deploy.agent import node_config
from fedlora.errors import UserError
from fedlora.flower.bridge import FlowerStrategy
from fedlora.flower.messages import RECORD, RESYNC, RunFacts
from fedlora.io import wire
from fedlora.io.agent_state import AgentPrivacy, Ledger, lock_state_dir, rows_digest
from fedlora.io.agent_task import AgentTask
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


def digest_of(data_file, task: AgentTask = AgentTask()) -> str:
    return rows_digest(task.load(data_file).rows())


def agent(
    data_file, state_dir, own: AgentPrivacy = AgentPrivacy(), node_id: int = 7, task: AgentTask = AgentTask(), run_id=1
) -> Context:
    """The node config ``fedlora client`` would give a SuperNode for this file (its task
    declared as the agent declares it at start), as Flower parses it."""
    if data_file.exists():
        local = task.load(data_file)
        task, digest, count = task.declared(local.label_names), rows_digest(local.rows()), len(local)
    else:
        task, digest, count = replace(task, labels=task.labels or LABELS), "0" * 64, 24
    node = parse_config_args([node_config(data_file, None, "cpu", own, state_dir, count, digest, task=task)])
    return Context(run_id=run_id, node_id=node_id, node_config=node, state=RecordDict(), run_config={})


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
    ledger = Ledger(tmp_path / "s", digest_of(data_file)).read()
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
    ledger = Ledger(tmp_path / "s", digest_of(data_file))
    ledger.path.unlink()
    record, _, _ = reply_of(train(msg, agent(data_file, tmp_path / "s")))
    assert record == {"declined": "ledger-lost"}
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(data_file.read_text().splitlines()[1:]))  # other rows: their own, fresh ledger
    assert Ledger(tmp_path / "s", digest_of(other)).read() == []
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


def diagnosis_file(tmp_path):
    """An agent's file with a column it never trains on: one row's diagnosis is HIV."""
    rows = [
        {"text": f"patient note {i}", "label": "urgent" if i % 2 else "routine", "diagnosis": d}
        for i, d in enumerate(["flu"] * 10 + ["cancer"] * 5 + ["HIV"])
    ]
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_accept_or_decline_never_depends_on_the_datas_content(tmp_path):
    """The coordinator asks, under its own column names and label lists, whether a value
    occurs in a column: every probe gets the same answer, and no budget moves."""
    data, state = diagnosis_file(tmp_path), tmp_path / "s"
    own = AgentPrivacy(epsilon=4.0)
    mine = ("routine", "urgent")
    first = coordinator(labels=mine).configure_train(1, None, None, Grid([7]))[0]
    assert "payload" in reply_of(train(first, agent(data, state, own)))[0]  # it trained: its ledger exists
    ledger = Ledger(state, digest_of(data)).path
    before = ledger.read_bytes()
    probes = [
        (labels, columns)
        for labels in (("flu",), ("flu", "cancer"), ("flu", "HIV"), ("cancer", "flu", "HIV"))
        for columns in ({"label_column": "diagnosis"}, {"label_column": "no-such-column"}, {"text_column": "diagnosis"})
    ]
    answers = set()
    for labels, columns in probes:
        msg = coordinator(labels=labels, **columns).configure_train(2, None, None, Grid([7]))[0]
        record, metrics, payload = reply_of(train(msg, agent(data, state, own)))
        answers.add((json.dumps(record, sort_keys=True), json.dumps(metrics, sort_keys=True), payload is None))
    assert answers == {('{"declined": "labels-mismatch"}', "{}", True)}
    assert ledger.read_bytes() == before
    # its own label set, in another order, under any column names: it trains on its own columns
    msg = coordinator(labels=("urgent", "routine"), label_column="diagnosis").configure_train(2, None, None, Grid([7]))[
        0
    ]
    assert reply_of(train(msg, agent(data, state, own)))[2] is not None


def test_a_declared_label_set_and_task_are_the_agents(tmp_path):
    data, state = diagnosis_file(tmp_path), tmp_path / "s"
    declared = AgentTask(labels=("routine", "urgent", "unknown"))  # more than its file holds: hides which occur
    wider = coordinator(labels=("unknown", "urgent", "routine", "other")).configure_train(1, None, None, Grid([7]))[0]
    assert reply_of(train(wider, agent(data, state, task=declared)))[2] is not None
    for labels in (("routine", "urgent"), ("routine", "unknown")):  # its file's set: still declined
        msg = coordinator(labels=labels).configure_train(1, None, None, Grid([7]))[0]
        assert reply_of(train(msg, agent(data, state, task=declared)))[0] == {"declined": "labels-mismatch"}
    causal = coordinator(labels=("routine", "urgent")).configure_train(1, None, None, Grid([7]))[0]
    causal.content[RECORD]["run_config"] = json.dumps(
        {**json.loads(causal.content[RECORD]["run_config"]), "task": "causal-lm"}
    )
    assert reply_of(train(causal, agent(data, state)))[0] == {"declined": "task-mismatch"}


def test_without_its_own_epsilon_an_agent_keeps_the_first_one_asked(data_file, tmp_path):
    state = tmp_path / "s"
    train(coordinator(dp_epsilon=3.0).configure_train(1, None, None, Grid([7]))[0], agent(data_file, state))
    ledger = Ledger(state, digest_of(data_file))
    assert ledger.epsilon() == 3.0 and sum(h[2] for h in ledger.read()) == 1
    spent = ledger.path.read_bytes()
    greedy = coordinator(dp_epsilon=1000.0).configure_train(2, None, None, Grid([7]))[0]
    assert reply_of(train(greedy, agent(data_file, state)))[0] == {"declined": "dp-epsilon-refused"}
    assert ledger.path.read_bytes() == spent
    modest = coordinator(dp_epsilon=2.9).configure_train(2, None, None, Grid([7]))[0]  # less than pinned: fine
    record, _, payload = reply_of(train(modest, agent(data_file, state)))
    assert payload is not None and payload.dp["epsilon"] <= 2.9 and ledger.epsilon() == 3.0
    own = coordinator(dp_epsilon=1000.0).configure_train(2, None, None, Grid([7]))[0]  # the agent's own wins
    assert reply_of(train(own, agent(data_file, state, AgentPrivacy(epsilon=5.0))))[2].dp["epsilon"] <= 5.0
    assert ledger.epsilon() == 5.0


def test_the_step_cap_counts_every_step_the_ledger_holds(data_file, tmp_path):
    state, own = tmp_path / "s", AgentPrivacy(epsilon=8.0, max_steps=3)
    for run_id in (1, 2):  # each run plans 3 steps: the first fits, a second would take the ledger to 4
        msg = coordinator().configure_train(1, None, None, Grid([7]))[0]
        record, _, payload = reply_of(train(msg, agent(data_file, state, own, run_id=run_id)))
    assert record == {"declined": "dp-steps-refused"}
    later = coordinator().configure_train(3, None, None, Grid([7]))[0]  # round 3 of 3 in the first run: 1 + 1 <= 3
    assert reply_of(train(later, agent(data_file, state, own)))[2] is not None
    assert sum(h[2] for h in Ledger(state, digest_of(data_file)).read()) == 2


def test_the_ledger_is_bound_to_the_parsed_rows_not_the_bytes(data_file, tmp_path):
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    same = {
        "newline.jsonl": data_file.read_text() + "\n",
        "reordered.jsonl": "\n".join(json.dumps(r) for r in reversed(rows)),
        "spaced.jsonl": "\n".join(json.dumps({**r, "text": " " + r["text"] + "  "}) for r in rows),
        "utf8.jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in rows),
        "table.csv": "text,label\n"
        + "".join(f'"{r["text"].replace(chr(34), chr(34) * 2)}",{r["label"]}\n' for r in rows),
    }
    digests = {digest_of(data_file)}
    for name, text in same.items():
        (tmp_path / name).write_text(text)
        digests.add(digest_of(tmp_path / name))
    assert len(digests) == 1
    (tmp_path / "edited.jsonl").write_text("\n".join(json.dumps({**r, "text": r["text"] + " more"}) for r in rows))
    assert digest_of(tmp_path / "edited.jsonl") not in digests
    # rows changed after the agent started: it does not train them under the old rows' ledger
    context = agent(data_file, tmp_path / "s")
    data_file.write_text("\n".join(json.dumps(r) for r in rows[1:]))
    msg = coordinator().configure_train(1, None, None, Grid([7]))[0]
    assert reply_of(train(msg, context))[0] == {"declined": "agent-error"}


def test_what_an_agent_holds_is_bounded_and_old_runs_are_removed(data_file, tmp_path):
    bridge = coordinator("ffa")
    first = bridge.configure_train(1, None, None, Grid([7]))[0]
    assert reply_of(train(first, agent(data_file, tmp_path / "s")))[2] is not None  # its frozen A: what FFA needs
    held = tmp_path / "s" / "runs" / "1" / "held.bin"
    kept = held.read_bytes()
    grown = bridge.configure_train(2, None, None, Grid([7]))[0]
    tensors = wire.decode(grown.content[RECORD]["payload"]).tensors
    extra = {f"merged.{i}.layer.lora_A.weight": torch.zeros(64, 4096) for i in range(40)}  # 10M numbers to keep
    grown.content[RECORD]["payload"] = wire.encode({**tensors, **extra}, kind="global")
    context = agent(data_file, tmp_path / "s")
    assert reply_of(train(grown, context))[0] == {"declined": "held-refused"}
    assert held.read_bytes() == kept and "fedlora-held" not in context.state.config_records

    for run_id in range(2, 5):  # runs served one after another: only the latest few keep their tensors
        train(
            coordinator("ffa").configure_train(1, None, None, Grid([7]))[0],
            agent(data_file, tmp_path / "s", run_id=run_id),
        )
    assert sorted(p.name for p in (tmp_path / "s" / "runs").iterdir()) == ["2", "3", "4"]
