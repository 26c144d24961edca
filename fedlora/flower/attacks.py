"""Simulated hostile clients, for tests and benchmarks only: never part of an agent.

A config file's ``[attack]`` table names the clients (partition ids), the kind and a
scale; ``fedlora simulate`` then runs the ordinary ClientApp wrapped in a Flower mod
that rewrites those clients' replies after honest training:

- ``scale``: the honest change, ``scale`` times larger (g + scale·(u − g));
- ``claim-examples``: the honest update, claiming 10**12 examples: uncapped, the global
  model becomes this one client's;
- ``flora-rank1``: FLoRA, one rank-1 pair per module along the honest update's top
  direction, ``scale`` times its strength, using scaling alpha/1;
- ``init-sketch``: Fed-SB, its initialisation sketches' U S multiplied by ``scale``;
- ``nan``: a NaN in the first tensor;
- ``oversized``: an extra tensor that takes the payload past ``max_update_mb``.
"""

from __future__ import annotations

import json

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.client.handler import train
from fedlora.config import RunConfig
from fedlora.flower.messages import RECORD
from fedlora.io import wire
from fedlora.ml.adapters import ROLE_A, ROLE_B, role_of
from fedlora.strategies.base import State, lora_deltas
from fedlora.strategies.fedsb import GRAD_U

CLAIMED_EXAMPLES = wire.MAX_EXAMPLES  # the most the decoder lets through: the weight cap must stop it


def _scaled_change(tensors: State, received: State, scale: float) -> State:
    return {n: received[n] + scale * (t - received[n]) if n in received else scale * t for n, t in tensors.items()}


def _rank1(tensors: State, alpha: float, scale: float) -> State:
    out = {n: t for n, t in tensors.items() if role_of(n) not in (ROLE_A, ROLE_B)}
    for m, dense in lora_deltas(tensors, alpha).items():
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        c = (scale * float(s[0]) / alpha) ** 0.5
        out[f"{m}.{ROLE_A}.weight"] = (c * vh[:1]).to(torch.float32)
        out[f"{m}.{ROLE_B}.weight"] = (c * u[:, :1]).to(torch.float32)
    return out


def attacked_payload(cfg: RunConfig, reply: bytes, received: State) -> bytes:
    """The reply ``cfg.attack_kind`` makes of an honest one."""
    payload = wire.decode(reply)
    tensors, claimed, kind, scale = payload.tensors, payload.num_examples, cfg.attack_kind, cfg.attack_scale
    if payload.kind == "init":
        if kind == "init-sketch":
            tensors = {n: t * scale if n.endswith(GRAD_U) else t for n, t in tensors.items()}
    elif kind == "scale":
        tensors = _scaled_change(tensors, received, scale)
    elif kind == "claim-examples":
        claimed = CLAIMED_EXAMPLES
    elif kind == "flora-rank1":
        tensors = _rank1(tensors, cfg.lora_alpha, scale)
    if kind == "nan":
        first = next(iter(tensors))
        tensors = {**tensors, first: torch.full_like(tensors[first], float("nan"))}
    if kind == "oversized":
        tensors = {**tensors, "oversized.weight": torch.zeros(cfg.max_update_mb * 1024 * 1024 // 4 + 1)}
    return wire.encode(
        tensors,
        kind=payload.kind,
        strategy=payload.strategy,
        round_num=payload.round,
        num_examples=claimed,
        metrics=payload.metrics,
        dp=payload.dp,
    )


def attack_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod: the named clients' replies are rewritten after honest training."""
    reply = call_next(msg, context)
    record = msg.content.config_records.get(RECORD)
    if record is None or reply.has_error():
        return reply
    cfg = RunConfig.from_dict(json.loads(record["run_config"]))
    if int(context.node_config["partition-id"]) not in cfg.attack_clients:
        return reply
    out = reply.content.config_records.get(RECORD)
    if out is None or "payload" not in out:  # declined
        return reply
    out["payload"] = attacked_payload(cfg, out["payload"], wire.decode(record["payload"]).tensors)
    return reply


def attacking_client_app() -> ClientApp:
    """The production ClientApp's handler behind ``attack_mod``."""
    app = ClientApp(mods=[attack_mod])
    app.train()(train)
    return app


app = attacking_client_app()  # ``fedlora.flower.attacks:app``: the ClientApp of a simulation under attack
