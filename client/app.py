"""The client agent (ClientApp): decode global state -> cached model -> local data -> train -> encode update."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import wire
from fedlora.adapters import adapter_state, reset_adapters, set_trainable
from fedlora.config import RunConfig
from fedlora.strategies import make_strategy
from fedlora.strategies.base import AdapterStrategy, State
from fedlora.strategies.flower_bridge import PHASE_INIT, RECORD
from fedlora.task import adapted_model, load_splits, lora_spec, tokenizer_for
from fedlora.training import full_weight_gradients, train_local

app = ClientApp()

HELD = "fedlora-held"  # context.state record: tensors kept between rounds


def partition_id(context: Context) -> int:
    """Simulation nodes carry ``partition-id`` in their node config."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this node has no partition-id in its node config") from None


def client_rank(cfg: RunConfig, pid: int) -> int:
    """FLoRA's per-client rank (``--ranks``, by partition id), else the run's rank."""
    return cfg.ranks[pid % len(cfg.ranks)] if cfg.ranks else cfg.rank


def merge_held(context: Context, strategy: AdapterStrategy, received: State) -> State:
    """Keep what a client must remember (frozen A/B, FLoRA's merge history) in its node state."""
    held = {}
    if HELD in context.state.config_records:
        held = wire.decode(context.state.config_records[HELD]["blob"]).tensors
    new = {n: t for n, t in received.items() if strategy.is_persistent(n)}
    if new:
        held.update(new)
        context.state[HELD] = ConfigRecord({"blob": wire.encode(held, kind="held")})
    return {**held, **received}


@app.train()
def train(msg: Message, context: Context) -> Message:
    record = msg.content[RECORD]
    cfg = RunConfig.from_dict(json.loads(record["run_config"]))
    round_num = int(record["round"])
    splits = load_splits(cfg)
    pid = partition_id(context)
    local = splits.train.subset(splits.partitions[pid])

    strategy = make_strategy(cfg.strategy, lora_spec(cfg), init_step=cfg.lr)
    spec = strategy.client_spec(client_rank(cfg, pid))
    net = adapted_model(cfg.model, len(splits.label_names), spec)
    state = merge_held(context, strategy, wire.decode(record["payload"]).tensors)
    seed = cfg.seed * 1_000_003 + round_num * 1_009 + pid
    tokenizer = tokenizer_for(cfg.model)
    wire_dtype = str(record.get("wire_dtype", "fp32"))
    header = {"strategy": strategy.name, "round_num": round_num, "num_examples": len(local), "wire_dtype": wire_dtype}

    if record.get("phase") == PHASE_INIT:
        reset_adapters(net)  # no adapter effect: the gradient is the base model's
        strategy.materialize(net, state)
        grads = full_weight_gradients(
            net, tokenizer, local, batches=cfg.init_batches, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed
        )
        blob = wire.encode(strategy.init_reply(grads), kind="init", **header)
        return Message(RecordDict({RECORD: ConfigRecord({"payload": blob})}), reply_to=msg)

    strategy.prepare_client_model(net, state, seed)
    set_trainable(net, strategy.trained_roles)
    stats = train_local(
        net, tokenizer, local, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, max_length=cfg.max_length, seed=seed
    )
    update = adapter_state(net, strategy.sent_roles)
    if pid in cfg.poison_clients:  # a simulated attacker: its honest change, scaled up
        update = {n: state[n] + cfg.poison_scale * (t - state[n]) if n in state else cfg.poison_scale * t for n, t in update.items()}
    blob = wire.encode_update(update, **header)
    metrics = MetricRecord(
        {"loss": stats.loss, "num-examples": len(local), "train-seconds": stats.seconds, "train-examples": stats.examples}
    )
    return Message(RecordDict({RECORD: ConfigRecord({"payload": blob}), "metrics": metrics}), reply_to=msg)
