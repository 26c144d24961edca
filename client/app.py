"""The client agent (ClientApp): decode global state -> cached model -> local data -> train -> encode update."""

from __future__ import annotations

import json

import torch

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import wire
from fedlora.adapters import adapter_state, load_adapter_state, set_trainable
from fedlora.config import RunConfig
from fedlora.strategies import make_strategy
from fedlora.strategies.flower_bridge import RECORD
from fedlora.task import adapted_model, load_splits, lora_spec, tokenizer_for
from fedlora.training import train_local

app = ClientApp()


def partition_id(context: Context) -> int:
    """Simulation nodes carry ``partition-id`` in their node config."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this node has no partition-id in its node config") from None


@app.train()
def train(msg: Message, context: Context) -> Message:
    record = msg.content[RECORD]
    cfg = RunConfig.from_dict(json.loads(record["run_config"]))
    round_num = int(record["round"])
    splits = load_splits(cfg)
    pid = partition_id(context)
    local = splits.train.subset(splits.partitions[pid])

    spec = lora_spec(cfg)
    strategy = make_strategy(cfg.strategy, spec)
    net = adapted_model(cfg.model, len(splits.label_names), spec)
    load_adapter_state(net, wire.decode(record["payload"]).tensors)
    set_trainable(net, strategy.trained_roles)

    stats = train_local(
        net,
        tokenizer_for(cfg.model),
        local,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        max_length=cfg.max_length,
        seed=cfg.seed * 1_000_003 + round_num * 1_009 + pid,
    )
    update = adapter_state(net, strategy.sent_roles)
    header = {"kind": "update", "strategy": strategy.name, "round": round_num, "num_examples": len(local)}
    blob = wire.encode(update, header, str(record.get("wire_dtype", "fp32")))
    metrics = MetricRecord(
        {"loss": stats.loss, "num-examples": len(local), "train-seconds": stats.seconds, "train-examples": stats.examples, "torch-threads": torch.get_num_threads()}
    )
    return Message(RecordDict({RECORD: ConfigRecord({"payload": blob}), "metrics": metrics}), reply_to=msg)
