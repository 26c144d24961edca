"""The ClientApp's train handler: decode global state -> cached model -> local data -> train -> encode update.

A deployed agent (``data-path`` in its node config, set by ``fedlora client``) trusts the
coordinator with nothing about its data (docs/design.md: Threat model): its own task (columns,
label set) and privacy settings override the coordinator's, a request outside them is
declined before any data is read, and no accept/decline depends on the data's content;
DP noise and Poisson samples come from the operating system's secure source; under DP a
reply carries the update and the DP statistics only; and whatever goes wrong goes
back as a short code (``Declined``), never as text derived from the data. A simulated
client is one party playing every role: it is seeded for reproducibility.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.flower.messages import (
    AGENT_ERROR,
    FACTS,
    HELD_DIGEST,
    PHASE_INIT,
    RECORD,
    RESYNC,
    RunFacts,
    decline,
)
from fedlora.flower.simulation import clients_train_on_cpu
from fedlora.io import wire
from fedlora.io.agent_state import AgentPrivacy, Ledger, LedgerLost, held_path, prune_runs, rows_digest
from fedlora.io.agent_task import AgentTask
from fedlora.io.report import write_json_atomic
from fedlora.ml import privacy
from fedlora.ml.adapters import adapter_state, reset_adapters, set_trainable
from fedlora.ml.data import TextDataset, align_labels
from fedlora.ml.instructions import InstructionDataset
from fedlora.ml.models import set_gradient_checkpointing
from fedlora.ml.task import adapted_model, load_splits, target_shapes, tokenizer_for
from fedlora.ml.training import LocalData, train_local, weight_gradients
from fedlora.strategies import build_strategy, init_batches
from fedlora.strategies.base import AdapterStrategy, State, held_digest
from fedlora.strategies.flora import FLoRA

log = logging.getLogger("fedlora")

HELD_REFUSED = "held-refused"  # a deployed agent's decline: the coordinator sent more to hold than the run needs
HELD = "fedlora-held"  # context.state record: tensors kept between rounds
DP_STATE = "fedlora-dp"  # context.state record: this client's privacy accountant history


class Declined(Exception):
    """This client does not train this round. ``code`` is all a deployed agent tells the
    coordinator; ``detail`` stays on the agent (and in a simulation's log)."""

    def __init__(self, code: str, detail: str = "", epsilon: float | None = None):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail, self.epsilon = code, detail, epsilon


def partition_id(context: Context) -> int:
    """Simulation nodes carry ``partition-id`` in their node config."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this node has no partition-id in its node config") from None


def client_rank(cfg: RunConfig, pid: int) -> int:
    """FLoRA's per-client rank (``--ranks``, by partition id), else the run's rank."""
    return cfg.ranks[pid % len(cfg.ranks)] if cfg.ranks else cfg.rank


def merge_held(
    context: Context,
    strategy: AdapterStrategy,
    received: State,
    held_file: Path | None = None,
    limit: int | None = None,
) -> State:
    """Keep what a client must remember (frozen A/B, FLoRA's merge history) in its node
    state and, for a deployed agent, on its disk: a restarted agent still has it. Past
    ``limit`` elements held, the message is declined and nothing is kept."""
    held = {}
    if HELD in context.state.config_records:
        held = wire.decode(context.state.config_records[HELD]["blob"]).tensors
    elif held_file is not None and held_file.is_file():
        held = wire.decode(held_file.read_bytes()).tensors
    if any(strategy.is_persistent(n) for n in received):
        held = strategy.hold(held, received)
        size = sum(t.numel() for t in held.values())
        if limit is not None and size > limit:
            raise Declined(HELD_REFUSED, f"would hold {size} numbers, more than this run's strategy needs ({limit})")
        blob = wire.encode(held, kind="held")
        context.state[HELD] = ConfigRecord({"blob": blob})
        if held_file is not None:
            tmp = held_file.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(held_file)
    return {**held, **received}


def dp_state_file(facts: RunFacts, pid: int) -> Path | None:
    """Where a simulated client keeps its accountant on disk, so that it outlives the
    simulation process (a resumed run must not start anyone's budget afresh)."""
    return Path(facts.client_state_dir) / str(pid) / "privacy.json" if facts.client_state_dir else None


def dp_history(context: Context, path: Path | None) -> privacy.History:
    if path is not None and path.exists():
        try:
            return [tuple(h) for h in json.loads(path.read_text())["history"]]
        except (ValueError, KeyError, TypeError) as exc:  # no budget known: refuse to train
            raise RuntimeError(f"unreadable privacy accountant {path}: {exc}") from None
    if DP_STATE in context.state.config_records:
        return [tuple(h) for h in json.loads(context.state.config_records[DP_STATE]["history"])]
    return []


def save_dp_history(context: Context, path: Path | None, history: privacy.History) -> None:
    text = json.dumps([list(h) for h in history])
    context.state[DP_STATE] = ConfigRecord({"history": text})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"history": [list(h) for h in history]})


def dp_stats(dp: privacy.DPPlan | None, history: privacy.History) -> dict | None:
    if dp is None:
        return None
    return {
        "epsilon": privacy.epsilon_of(history, dp.delta, dp.accountant),
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "sample_rate": dp.sample_rate,
        "steps": sum(h[2] for h in history),
        "max_grad_norm": dp.clip,
    }


def epsilon_metric(dp: privacy.DPPlan | None, history: privacy.History) -> MetricRecord:
    return MetricRecord({} if dp is None else {"epsilon": privacy.epsilon_of(history, dp.delta, dp.accountant)})


@dataclass
class LocalSetup:
    """What one client trains on, and how."""

    data: LocalData
    index: int  # seeds and (simulation) FLoRA rank: the partition id, or the node id when deployed
    rank: int
    num_labels: int
    device: torch.device
    dp_epsilon: float | None  # the budget this client trains under: a deployed agent's own, else the run's
    dp_delta: float
    dp_clip: float
    dp_file: Path | None
    simulated: bool
    ledger: Ledger | None = None  # a deployed agent's privacy ledger for this data file
    held_file: Path | None = None
    quantize: str = "none"  # the frozen base in memory: none, 4bit or 8bit (a deployed agent's own choice)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available on this machine")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: choose auto, cuda or cpu")
    return torch.device(name)


def simulated_device(cfg: RunConfig) -> torch.device:
    """A simulated client trains on CUDA when Ray gave it a GPU share (``--gpus-per-client``,
    by default whenever CUDA is present), else on the CPU."""
    return torch.device("cpu" if clients_train_on_cpu(cfg) else "cuda")


def check_request(cfg: RunConfig, own: AgentPrivacy, num_examples: int) -> None:
    """A deployed agent's verdict on the coordinator's settings, before any data is read."""
    try:
        cfg.validate()
    except UserError as exc:
        raise Declined("bad-request", str(exc)) from None
    if own.epsilon is None and cfg.dp_epsilon is None:
        return
    delta = own.delta_for(num_examples)
    if cfg.dp_delta > delta:
        raise Declined(
            "dp-delta-refused", f"the coordinator asks for delta {cfg.dp_delta:g}, this agent allows at most {delta:g}"
        )


def check_task(cfg: RunConfig, facts: RunFacts, task: AgentTask) -> None:
    """Whether the agent takes part in this run, decided from the coordinator's declared task
    and label list against the agent's own declared ones, before any data is read: under
    DP the agent's declared label set is all an accept or decline can tell."""
    if cfg.task != task.task:
        raise Declined("task-mismatch", f"the run's task is {cfg.task}, this agent's is {task.task}")
    if task.task != "classify":
        return
    if not facts.labels:
        raise Declined("no-labels", "the coordinator sent no label set")
    if len(set(facts.labels)) != len(facts.labels):
        raise Declined("bad-request", "the coordinator's label list names a label twice")
    if not task.labels:
        raise Declined(AGENT_ERROR, "this agent declares no label set")
    missing = set(task.labels) - set(facts.labels)
    if missing:
        raise Declined("labels-mismatch", f"the coordinator's label list lacks {len(missing)} of this agent's labels")


def steps_left(cfg: RunConfig, strategy: AdapterStrategy, round_num: int, is_init: bool) -> int:
    """The DP steps the run plans from this message to its end (at least this message's)."""
    if is_init:
        return privacy.planned_steps(cfg.rounds, cfg.local_steps, init_batches(strategy, cfg))
    return max(cfg.rounds - round_num + 1, 1) * cfg.local_steps


def check_budget(cfg: RunConfig, own: AgentPrivacy, ledger: Ledger, steps: int) -> None:
    """Before any data is read: the epsilon this data's budget is pinned to (the agent's own,
    else the first DP request's) and the step cap over every step its ledger holds."""
    if own.epsilon is None and cfg.dp_epsilon is None:
        return
    try:
        pinned, spent = ledger.epsilon(), sum(h[2] for h in ledger.read())
    except LedgerLost as exc:
        raise Declined("ledger-lost", str(exc)) from None
    if own.epsilon is None and pinned is not None and cfg.dp_epsilon > pinned:
        raise Declined(
            "dp-epsilon-refused",
            f"the coordinator asks for epsilon {cfg.dp_epsilon:g}, this data is pinned to {pinned:g}",
        )
    if spent + steps > own.max_steps:
        raise Declined(
            "dp-steps-refused",
            f"{spent} DP steps spent and {steps} more planned, this agent allows at most {own.max_steps}",
        )
    target = own.epsilon if own.epsilon is not None else pinned if pinned is not None else cfg.dp_epsilon
    if target != pinned:
        ledger.pin(target)


def node_ledger(node: Mapping) -> Ledger:
    """A deployed agent's ledger for its data, keyed by the digest of the rows it read at start."""
    if not node.get("state-dir") or not node.get("data-digest"):
        raise Declined(AGENT_ERROR, "this agent has no state folder or data digest in its node config")
    return Ledger(Path(str(node["state-dir"])), str(node["data-digest"]))


def check_agent_request(cfg: RunConfig, facts: RunFacts, strategy: AdapterStrategy, context: Context, record) -> None:
    """Everything a deployed agent decides before it reads its data."""
    node = context.node_config
    own = AgentPrivacy.from_node(node)
    check_request(cfg, own, int(node.get("num-examples", 0) or 0))
    check_task(cfg, facts, AgentTask.from_node(node))
    steps = steps_left(cfg, strategy, int(record["round"]), record.get("phase") == PHASE_INIT)
    check_budget(cfg, own, node_ledger(node), steps)


def agent_data(cfg: RunConfig, facts: RunFacts, node: Mapping) -> TextDataset | InstructionDataset:
    """A deployed agent's own file, read with its own columns, its labels numbered as the
    coordinator's list names them; the rows must still be those whose digest keys its ledger."""
    data = AgentTask.from_node(node).load(str(node["data-path"]))
    if node.get("data-digest") and rows_digest(data.rows()) != node["data-digest"]:
        raise Declined(AGENT_ERROR, "the data file changed since this agent started: restart it")
    if cfg.task == "causal-lm":
        return data
    try:
        return align_labels(data, facts.labels)
    except UserError as exc:  # the file holds a label the agent did not declare: its own fault, whatever was asked
        raise Declined(AGENT_ERROR, str(exc)) from None


def held_limit(cfg: RunConfig, strategy: AdapterStrategy, rank: int) -> int:
    """The most numbers a deployed agent holds for a run: the frozen A and B of the adapted
    layers at the rank it trains, and FLoRA's merge history at its bound on ranks per layer."""
    ranks = (strategy.client_spec(rank).rank if strategy.frozen_roles else 0) + (
        strategy.history_rank if isinstance(strategy, FLoRA) else 0
    )
    if ranks == 0:
        return 0
    shapes = target_shapes(cfg.model, cfg.task, cfg.pooling, tuple(cfg.target_modules))
    return ranks * sum(d_out + d_in for d_out, d_in in shapes)


def local_setup(cfg: RunConfig, facts: RunFacts, context: Context) -> LocalSetup:
    """A deployed agent (``data-path`` in its node config) reads its own file; a simulated
    client takes its partition of the run's data."""
    node = context.node_config
    if "data-path" in node:
        data = agent_data(cfg, facts, node)
        own = AgentPrivacy.from_node(node)
        state_dir = Path(str(node["state-dir"])) if node.get("state-dir") else None
        digest = node.get("data-digest")
        if state_dir is not None:
            prune_runs(state_dir, context.run_id)
        return LocalSetup(
            data=data,
            index=int(context.node_id) % 1_000_003,
            rank=int(node.get("rank", 0)) or cfg.rank,
            num_labels=len(facts.labels) if cfg.task == "classify" else 0,
            device=pick_device(str(node.get("device", "auto"))),
            dp_epsilon=own.epsilon if own.epsilon is not None else cfg.dp_epsilon,
            dp_delta=own.delta_for(len(data)),
            dp_clip=own.clip,
            dp_file=None,
            simulated=False,
            ledger=Ledger(state_dir, str(digest)) if state_dir and digest else None,
            held_file=held_path(state_dir, context.run_id) if state_dir else None,
            quantize=str(node.get("quantize", "none")),
        )
    splits = load_splits(cfg)
    pid = partition_id(context)
    return LocalSetup(
        data=splits.train.subset(splits.partitions[pid]),
        index=pid,
        rank=client_rank(cfg, pid),
        num_labels=len(splits.label_names),
        device=simulated_device(cfg),
        dp_epsilon=cfg.dp_epsilon,
        dp_delta=cfg.dp_delta,
        dp_clip=cfg.dp_clip,
        dp_file=dp_state_file(facts, pid),
        simulated=True,
        quantize=cfg.quantize,
    )


def train(msg: Message, context: Context) -> Message:
    deployed = "data-path" in context.node_config
    try:
        return _train(msg, context, deployed)
    except Declined as exc:
        log.warning("declined round: %s", exc)
        return decline(msg, exc.code if deployed else str(exc), exc.epsilon)
    except Exception:
        if not deployed:
            raise
        # the full story stays on this machine: it may quote the data
        log.exception("this agent failed a round; the coordinator is told only 'agent-error'")
        return decline(msg, AGENT_ERROR, None)


@dataclass
class Request:
    """One message from the coordinator, read: the run's settings and facts, this client's
    setup and the global state it now holds."""

    cfg: RunConfig
    strategy: AdapterStrategy
    setup: LocalSetup
    state: State
    round_num: int
    is_init: bool
    wire_dtype: str
    init_dtype: str


def read_request(msg: Message, context: Context, deployed: bool) -> Request:
    record = msg.content[RECORD]
    cfg = RunConfig.from_dict(json.loads(record["run_config"]))
    facts = RunFacts.from_json(str(record.get(FACTS, "{}")))
    strategy = build_strategy(cfg)
    if deployed:
        check_agent_request(cfg, facts, strategy, context, record)
    setup = local_setup(cfg, facts, context)
    limit = held_limit(cfg, strategy, setup.rank) if deployed else None
    state = merge_held(context, strategy, wire.decode(record["payload"]).tensors, setup.held_file, limit)
    if HELD_DIGEST in record and held_digest(strategy, state) != record[HELD_DIGEST]:
        raise Declined(RESYNC, "this client lacks tensors the coordinator sent before")
    wire_dtype = str(record.get("wire_dtype", "fp32"))
    return Request(
        cfg,
        strategy,
        setup,
        state,
        int(record["round"]),
        record.get("phase") == PHASE_INIT,
        wire_dtype,
        str(record.get("init_dtype", wire_dtype)),
    )


def plan_privacy(req: Request, history: privacy.History) -> privacy.DPPlan | None:
    """This client's DP plan for the run, or None without DP; declines a round that would
    take it over its budget."""
    cfg, setup = req.cfg, req.setup
    if setup.dp_epsilon is None:
        return None
    total = privacy.planned_steps(cfg.rounds, cfg.local_steps, init_batches(req.strategy, cfg))
    dp = privacy.plan(
        setup.dp_epsilon, setup.dp_delta, setup.dp_clip, len(setup.data), cfg.batch_size, total, cfg.dp_accountant
    )
    steps = cfg.init_batches if req.is_init else cfg.local_steps
    if privacy.would_exceed(history, dp, steps):
        spent = privacy.epsilon_of(history, dp.delta, dp.accountant)
        raise Declined(
            "privacy-budget", f"{steps} more steps would exceed epsilon {dp.epsilon} (spent {spent:.3f})", spent
        )
    return dp


@dataclass
class LocalRun:
    """What this message's local work runs with, once the request is accepted."""

    net: torch.nn.Module
    tokenizer: object
    seed: int  # model-side randomness (dropout, adapter init, batch order)
    run_seed: int  # DP noise and Poisson sampling: the seed in simulation, secret when deployed
    dp: privacy.DPPlan | None
    history: privacy.History
    header: dict


def start_local_run(req: Request, context: Context) -> LocalRun:
    cfg, strategy, setup = req.cfg, req.strategy, req.setup
    spec = strategy.client_spec(setup.rank)
    net = adapted_model(cfg.model, setup.num_labels, spec, cfg.task, cfg.pooling, setup.quantize, setup.device)
    net.to(setup.device)
    set_gradient_checkpointing(net, cfg.gradient_checkpointing)
    seed = cfg.seed * 1_000_003 + req.round_num * 1_009 + setup.index
    history = read_history(context, setup)
    dp = plan_privacy(req, history)
    run_seed = seed if dp is None or setup.simulated else secrets.randbits(63)
    header = {"strategy": strategy.name, "round_num": req.round_num, "num_examples": len(setup.data)}
    if dp is not None and not setup.simulated:
        # the count is the aggregation weight: only as fine as the public sample rate
        header["num_examples"] = round(cfg.batch_size / dp.sample_rate)
    return LocalRun(net, tokenizer_for(cfg.model, cfg.task), seed, run_seed, dp, history, header)


def _train(msg: Message, context: Context, deployed: bool) -> Message:
    handler_start = time.perf_counter()
    req = read_request(msg, context, deployed)
    run = start_local_run(req, context)
    if req.is_init:
        return Message(init_reply(req, run, context), reply_to=msg)
    return Message(train_reply(req, run, context, handler_start), reply_to=msg)


def init_reply(req: Request, run: LocalRun, context: Context) -> RecordDict:
    """The federated initialisation's reply: this client's full-weight gradients, sketched."""
    cfg, setup = req.cfg, req.setup
    reset_adapters(run.net)  # no adapter effect: the gradient is the base model's
    req.strategy.materialize(run.net, req.state)
    grads, history = weight_gradients(
        run.net,
        run.tokenizer,
        setup.data,
        dp=run.dp,
        history=run.history,
        batches=cfg.init_batches,
        seed=run.run_seed,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        device=setup.device,
    )
    save_history(context, setup, run.dp, history)
    blob = wire.encode(
        req.strategy.init_reply(grads),
        kind="init",
        dp=dp_stats(run.dp, history),
        wire_dtype=req.init_dtype,
        **run.header,
    )
    return RecordDict({RECORD: ConfigRecord({"payload": blob}), "metrics": epsilon_metric(run.dp, history)})


def train_reply(req: Request, run: LocalRun, context: Context, handler_start: float) -> RecordDict:
    """A training round's reply: the trained adapter pieces and what the client may report."""
    cfg, strategy, setup, dp = req.cfg, req.strategy, req.setup, run.dp
    strategy.prepare_client_model(run.net, req.state, run.seed)
    set_trainable(run.net, strategy.trained_roles)
    stats, history = train_local(
        run.net,
        run.tokenizer,
        setup.data,
        dp=dp,
        history=run.history,
        seed=run.run_seed,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        head_lr=cfg.head_lr,
        max_length=cfg.max_length,
        device=setup.device,
    )
    save_history(context, setup, dp, history)
    update = adapter_state(run.net, strategy.sent_roles)
    blob = wire.encode_update(update, dp=dp_stats(dp, history), wire_dtype=req.wire_dtype, **run.header)
    if dp is not None and not setup.simulated:  # nothing un-noised about the data: the DP statistics only
        return RecordDict({RECORD: ConfigRecord({"payload": blob}), "metrics": epsilon_metric(dp, history)})
    metrics = MetricRecord(
        {
            "loss": stats.loss,
            "num-examples": len(setup.data),
            "train-seconds": stats.seconds,
            "train-examples": stats.examples,
            "train-tokens": stats.tokens,
        }
    )
    metrics.update(epsilon_metric(dp, history))
    metrics["client-seconds"] = time.perf_counter() - handler_start  # training plus decode, set-up and encode
    return RecordDict({RECORD: ConfigRecord({"payload": blob}), "metrics": metrics})


def save_history(context: Context, setup: LocalSetup, dp: privacy.DPPlan | None, history: privacy.History) -> None:
    """After a DP step: the agent's ledger, the node state and (simulation) the accountant file."""
    if dp is None:
        return
    if setup.ledger is not None:
        setup.ledger.write(history)
    save_dp_history(context, setup.dp_file, history)


def read_history(context: Context, setup: LocalSetup) -> privacy.History:
    """A deployed agent's budget comes from its ledger alone; a lost ledger is no fresh budget."""
    if setup.ledger is None:
        return dp_history(context, setup.dp_file)
    try:
        return setup.ledger.read()
    except LedgerLost as exc:
        raise Declined("ledger-lost", str(exc)) from None
